"""Tensor, pipeline and data parallelism: the usual groups of a launch, in one call.

::

    layout = distrib.parallel.layout(tp=2, pp=2)        # dp: whatever the world size leaves
    tp_comm = distrib.communicator.create(layout.tp)    # the all-reduce after attention and MLP
    pp_comm = distrib.communicator.create(layout.pp)    # activations to the next stage
    if not layout.is_first_stage:
        pp_comm.recv(hidden, layout.pp.rank - 1)

Ranks are arranged as in vLLM's ``parallel_state``: tensor parallelism
innermost, then pipeline stages, then data-parallel replicas::

    rank = (dp_rank * pp + pp_rank) * tp + tp_rank

so a TP group is ``tp`` consecutive ranks (on one node, since launchers give a
node consecutive ranks), a PP group the ranks ``tp`` apart that hold the
stages of one replica, and a DP group the ranks ``tp * pp`` apart that hold
the same shard in every replica. Each group is a Coordinator
(:meth:`Coordinator.group`), started by its members alone, so a replica that
is late holds no other replica back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

from .coordinator.api import Coordinator
from .errors import ConfigError

__all__ = ["Layout", "layout"]


@dataclass(frozen=True)
class Layout:
    """This rank's groups: ``tp``, ``pp`` and ``dp`` Coordinators, and ``world`` they came from."""

    world: Coordinator
    tp: Coordinator
    pp: Coordinator
    dp: Coordinator

    @property
    def tp_size(self) -> int:
        return self.tp.world_size

    @property
    def pp_size(self) -> int:
        return self.pp.world_size

    @property
    def dp_size(self) -> int:
        return self.dp.world_size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.pp.rank

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica."""
        return self.dp.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.world_size - 1

    def close(self) -> None:
        """Close the three group coordinators (not ``world``). Idempotent; not a collective."""
        for group in (self.tp, self.pp, self.dp):
            group.close()


def layout(tp: int = 1, pp: int = 1, dp: Optional[int] = None, *,
           coordinator: Optional[Coordinator] = None, tp_within_node: bool = True,
           timeout: Optional[float] = None) -> Layout:
    """Make this rank's TP, PP and DP groups (every rank of ``coordinator`` calls it alike).

    - ``tp``, ``pp``, ``dp``: the group sizes; ``dp`` defaults to what the
      world size leaves, and ``tp * pp * dp`` must be the world size.
    - ``coordinator``: the ranks to arrange (default ``distrib.init().coordinator``,
      the whole launch; a group works too).
    - ``tp_within_node``: refuse a TP group that would span nodes (tensor
      parallelism all-reduces twice per layer, which wants NVLink and the
      custom all-reduce); pass False to allow it.
    - ``timeout``: bounds each group's start-up (default: the coordinator's);
      a member that never arrives is named by global rank.

    Raises :class:`ConfigError` before any group is made for sizes that are
    not positive ints or do not multiply to the world size, and for a TP
    group across nodes.
    """
    if coordinator is None:
        from .runtime import init

        coordinator = init().coordinator
    world = coordinator.world_size
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"layout {name}={size!r} must be an int >= 1")
    if dp is None:
        if world % (tp * pp):
            raise ConfigError(f"layout tp={tp} x pp={pp} = {tp * pp} does not divide the world size "
                              f"{world}; choose sizes whose product divides it")
        dp = world // (tp * pp)
    if tp * pp * dp != world:
        raise ConfigError(f"layout tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp}, but the world size is "
                          f"{world}; the sizes must multiply to it")
    if tp_within_node and coordinator.nnodes > 1 and coordinator.local_world_size % tp:
        raise ConfigError(
            f"layout tp={tp}: a TP group of {tp} consecutive ranks would span nodes, which hold "
            f"{coordinator.local_world_size} ranks each; choose tp dividing {coordinator.local_world_size}, "
            "or pass tp_within_node=False to allow TP across nodes")

    rank = coordinator.rank
    tp_rank, pp_rank, dp_rank = rank % tp, rank // tp % pp, rank // (tp * pp)
    first = (dp_rank * pp + pp_rank) * tp
    tp_ranks = [first + i for i in range(tp)]
    pp_ranks = [(dp_rank * pp + i) * tp + tp_rank for i in range(pp)]
    dp_ranks = [(i * pp + pp_rank) * tp + tp_rank for i in range(dp)]
    # This rank is a member of each, so each is a Coordinator, not None.
    tp_group = cast(Coordinator, coordinator.group(tp_ranks, name="tp", timeout=timeout))
    if tp_within_node and tp_group.nnodes > 1:  # the same answer on every member
        tp_group.close()
        raise ConfigError(f"layout tp={tp}: {tp_group.describe()} spans {tp_group.nnodes} nodes; "
                          "pass tp_within_node=False to allow TP across nodes")
    pp_group = cast(Coordinator, coordinator.group(pp_ranks, name="pp", timeout=timeout))
    dp_group = cast(Coordinator, coordinator.group(dp_ranks, name="dp", timeout=timeout))
    return Layout(world=coordinator, tp=tp_group, pp=pp_group, dp=dp_group)
