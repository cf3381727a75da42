"""Several custom all-reduce communicators timed side by side, in turns, in the same processes.

Used by the benches that compare kernel variants (``failstop``'s cost,
``kernel-ab``): each round times every variant once, as a CUDA-graph replay of
``len(outs)`` all-reduces and as ``eager_calls`` eager calls, so that drift
(clocks, the other ranks on a shared GPU) hits all variants alike.
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from ..communicator.api import Communicator


def time_in_turns(ctx, comms: Mapping[Any, Communicator], x, outs: list, rounds: int, eager_calls: int,
                  expect: Optional[float] = None) -> tuple[dict, dict]:
    """Per-call microseconds per ``(mode, key)``, one per round; and per mode, the wrong results.

    Each communicator's graph is captured (and registered) first. With
    ``expect``, every output of every replay and eager call is checked against
    it exactly; otherwise nothing is checked (the counts stay 0).
    """
    import torch

    graphs = {}
    for key, comm in comms.items():
        graph = torch.cuda.CUDAGraph()
        with comm.capture():
            comm.all_reduce(x, out=outs[0])
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for out in outs:
                    comm.all_reduce(x, out=out)
        graphs[key] = graph
    times: dict = {(mode, key): [] for mode in ("graph", "eager") for key in comms}
    wrong = {"graph": 0, "eager": 0}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for key, comm in comms.items():
            ctx.coordinator.barrier()
            start.record()
            graphs[key].replay()
            end.record()
            end.synchronize()
            times[("graph", key)].append(start.elapsed_time(end) * 1e3 / len(outs))
            if expect is not None:
                wrong["graph"] += sum(not bool((out == expect).all()) for out in outs)
            ctx.coordinator.barrier()
            start.record()
            for _ in range(eager_calls):
                comm.all_reduce(x, out=outs[0])
            end.record()
            end.synchronize()
            times[("eager", key)].append(start.elapsed_time(end) * 1e3 / eager_calls)
            if expect is not None:
                wrong["eager"] += not bool((outs[0] == expect).all())
    return times, wrong


def median_round_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round (drift cancels in each)."""
    return statistics.median(x / y for x, y in zip(a, b))
