"""The gloo communicator on CPU tensors, on real ranks."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import distrib
from communicator_support import run_ranks
from distrib.communicator.gloo import GlooCommunicator
from distrib.errors import CommunicatorError, DistribError, DistribTimeoutError
from distrib.testing import launch_conformance


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_gloo_passes_the_conformance_suite(nprocs):
    reports = launch_conformance("gloo", nprocs, start_method="forkserver", timeout=240)
    assert [r.rank for r in reports] == list(range(nprocs))
    expected = {"all_reduce", "all_reduce_out", "all_gather", "reduce_scatter", "broadcast",
                "can_all_reduce", "bad_inputs", "close"} | ({"debug_mode", "send_recv"} if nprocs > 1 else set())
    for report in reports:
        assert report.communicator == "gloo" and report.world_size == nprocs
        assert set(report.passed) == expected, report


def _two_communicators_and_the_default_group():
    ctx = distrib.init()
    first = GlooCommunicator(ctx.coordinator)
    second = GlooCommunicator(ctx.coordinator)
    untouched = not torch.distributed.is_initialized()
    # Interleaved calls on two communicators never mix their data.
    a = torch.full((5,), float(ctx.rank + 1))
    b = torch.full((3,), 10.0 * (ctx.rank + 1))
    first.all_reduce(a)
    second.all_reduce(b, "max")
    # The user's own default group still comes up, beside ours.
    torch.distributed.init_process_group("gloo")
    c = torch.ones(2)
    torch.distributed.all_reduce(c)
    first.all_reduce(a)
    torch.distributed.destroy_process_group()
    first.close()
    second.close()
    return untouched, a.tolist(), b.tolist(), c.tolist()


def test_communicators_are_independent_and_leave_the_default_group_alone():
    for untouched, a, b, c in run_ranks(_two_communicators_and_the_default_group, 2):
        assert untouched
        assert a == [6.0] * 5  # (1 + 2), then summed again over 2 ranks
        assert b == [20.0] * 3
        assert c == [2.0, 2.0]


def _numpy_in_place():
    ctx = distrib.init()
    comm = GlooCommunicator(ctx.coordinator)
    a = np.full(4, ctx.rank + 1, dtype=np.int32)
    result = comm.all_reduce(a)
    gathered = comm.all_gather(np.array([ctx.rank], dtype=np.int64))
    comm.close()
    return result is a, a.tolist(), gathered.tolist()


def test_numpy_arrays_are_reduced_in_place():
    for same, values, gathered in run_ranks(_numpy_in_place, 2):
        assert same and values == [3, 3, 3, 3] and gathered == [[0], [1]]


def _one_rank_skips_the_call(timeout):
    ctx = distrib.init()
    comm = GlooCommunicator(ctx.coordinator, timeout=timeout)
    outcome = None
    if ctx.rank == 0:
        started = time.monotonic()
        try:
            comm.all_reduce(torch.ones(8))
        except DistribError as exc:
            outcome = (type(exc).__name__, str(exc), time.monotonic() - started)
        try:
            comm.all_reduce(torch.ones(8))
        except CommunicatorError as exc:
            outcome += (str(exc),)
    ctx.coordinator.barrier()  # rank 1 stays until rank 0 has seen its timeout
    comm.close()
    return outcome


def test_a_missing_peer_times_out_instead_of_hanging():
    outcome = run_ranks(_one_rank_skips_the_call, 2, 2.0)[0]
    kind, message, seconds, afterwards = outcome
    assert kind == DistribTimeoutError.__name__, message
    assert "timed out after 2s" in message and "rank 0" in message
    assert seconds < 60
    assert "unusable after an earlier failure" in afterwards
