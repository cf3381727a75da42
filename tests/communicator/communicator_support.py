"""Helpers for the communicator tests, importable by worker processes.

- :func:`run_ranks` runs a function on N CPU ranks through ``distrib.launch``
  with the forkserver start method (the fork server imports torch once, so a
  launch costs a fraction of a second instead of seconds per rank in CI);
- communicators for the tests: fast paths that decline some tensors, ones that
  fail to start on one rank, and deliberately broken ones the conformance suite
  must catch. Each is a small subclass of the gloo communicator.
"""
from __future__ import annotations

import os
from typing import Optional

import distrib
from distrib.communicator import Collective, ReduceOp, TensorView, communicators
from distrib.communicator.gloo import GlooCommunicator
from distrib.errors import CommunicatorError


def run_ranks(fn, nprocs: int, *args, start_method: str = "forkserver", timeout: float = 120.0, **kwargs):
    """``fn(*args, **kwargs)`` on ``nprocs`` CPU ranks; per-rank results in rank order."""
    return distrib.launch(fn, nprocs, args=args, kwargs=kwargs, devices="cpu",
                          start_method=start_method, timeout=timeout)


class EvenOnly(GlooCommunicator):
    """A "fast path" whose all_reduce takes only tensors with an even number of elements."""

    name = "even_only"
    priority = 50
    calls = 0

    def _check_limits(self, collective: Collective, view: TensorView, op: ReduceOp) -> Optional[str]:
        if collective is Collective.ALL_REDUCE and view.numel % 2:
            return f"takes even sizes only, got {view.numel} elements"
        return super()._check_limits(collective, view, op)

    def _all_reduce(self, src, dst, op):
        type(self).calls += 1
        super()._all_reduce(src, dst, op)


class MissingOnRankOne(GlooCommunicator):
    """Available everywhere except on rank 1."""

    name = "missing_on_rank_one"
    priority = 60

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        return "needs hardware this rank lacks" if coordinator.rank == 1 else None


class FailsToStartOnRankOne(GlooCommunicator):
    """Available everywhere, but its initialisation fails on rank 1."""

    name = "fails_on_rank_one"
    priority = 70

    def _initialize(self, token: bytes) -> None:
        super()._initialize(token)
        if self.rank == 1:
            raise CommunicatorError("peer access test failed")


class NeedsEnvironment(GlooCommunicator):
    """Registered with no priority: used only when named."""

    name = "needs_environment"
    priority = None

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        return None if os.environ.get("FAKE_HARDWARE") else "FAKE_HARDWARE is not set"


# -- broken on purpose: the conformance suite must catch each ------------------------

class MaxIsSum(GlooCommunicator):
    name = "broken_max"

    def _all_reduce(self, src, dst, op):
        super()._all_reduce(src, dst, ReduceOp.SUM if op is ReduceOp.MAX else op)


class IgnoresOut(GlooCommunicator):
    name = "broken_out"

    def _all_reduce(self, src, dst, op):
        super()._all_reduce(src, src, op)  # reduces in place and never writes out
        if dst.ptr != src.ptr:
            dst.tensor.copy_(src.tensor)


class BroadcastDoesNothing(GlooCommunicator):
    name = "broken_broadcast"

    def _broadcast(self, view, src):
        pass


class GathersInReverse(GlooCommunicator):
    name = "broken_gather"

    def _all_gather(self, src, dst):
        super()._all_gather(src, dst)
        flat = dst.tensor.view(self.world_size, -1)
        flat.copy_(flat.flip(0))


def register_fakes() -> None:
    """Register the fakes that take part in a default dispatcher chain (in this process)."""
    for cls in (EvenOnly, MissingOnRankOne, FailsToStartOnRankOne, NeedsEnvironment):
        communicators.register(cls.name, cls, replace=True)
