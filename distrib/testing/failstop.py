"""Fail-stop scenarios of the custom all-reduce, for its GPU tests and `python -m distrib.bench failstop`.

Each scenario makes a fresh custom communicator, drives it into a failure
(a peer that stalls past the timeout, a replay before registration, ...)
and records what every call returned: ``exact`` (the right sum, bit for
bit), ``nan`` (the poisoned output), ``raised`` (a CommunicatorError), or
``wrong`` (anything else: the one outcome fail-stop must rule out).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import distrib

ALGORITHMS = ("lamport_one_shot", "one_shot", "two_shot")
NBYTES = {"lamport_one_shot": 4096, "one_shot": 64 << 10, "two_shot": 512 << 10}


def custom(algorithm: Optional[str] = None, **options):
    """A custom communicator alone (no fallback), on this rank's device."""
    from distrib.communicator.custom import CustomAllReduceCommunicator

    ctx = distrib.init()
    return ctx, CustomAllReduceCommunicator(ctx.coordinator, ctx.device, algorithm=algorithm,
                                            max_bytes=1 << 20, **options)


def error_of(call) -> Optional[str]:
    """The message of the CommunicatorError ``call()`` raises, or None if it raises none."""
    try:
        call()
    except distrib.CommunicatorError as exc:
        return str(exc)
    return None


def outcome(out, expected) -> str:
    import torch

    if torch.equal(out, expected):
        return "exact"
    return "nan" if bool(torch.isnan(out).any()) else "wrong"


def late_peer(mode: str, algorithm: str, stall_rank: int, *, timeout: float = 0.3, stall: float = 0.9,
              calls: int = 10, stall_at: int = 3, log: Optional[str] = None,
              on_error: str = "raise") -> list[str]:
    """``calls`` all-reduces (eager, or replays of one captured all-reduce) with fresh inputs;
    ``stall_rank`` sleeps ``stall`` seconds before call ``stall_at``. Every rank keeps calling."""
    import torch

    ctx, comm = custom(algorithm, timeout=timeout, on_error=on_error)
    rank, world = ctx.info.rank, ctx.info.world_size
    n = NBYTES[algorithm] // 4
    x = torch.empty(n, device="cuda")
    out = torch.empty_like(x)
    graph = None
    if mode == "graph":
        with comm.capture():
            x.fill_(1.0)
            comm.all_reduce(x, out=out)  # warm-up, eager
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                comm.all_reduce(x, out=out)
    ctx.coordinator.barrier()
    outcomes = []
    for i in range(calls):
        x.fill_(float(rank + 1 + i))
        expected = torch.full_like(x, float(world * (world + 1) // 2 + world * i))
        if rank == stall_rank and i == stall_at:
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps([rank, i, "stall", time.time()]) + "\n")
            time.sleep(stall)
        try:
            if graph is not None:
                graph.replay()
            else:
                comm.all_reduce(x, out=out)
            torch.cuda.synchronize()
            result = outcome(out, expected)
        except distrib.CommunicatorError:
            result = "raised"
        outcomes.append(result)
        if log:
            with open(log, "a") as f:
                f.write(json.dumps([rank, i, result, time.time()]) + "\n")
    if on_error == "raise":
        message = error_of(comm.check)
        if message is not None:
            outcomes.append(f"check: {message}")
    ctx.coordinator.barrier()
    comm.close()
    return outcomes


def late_peer_rounds(reps: int, stall_rank: int, **options) -> dict:
    """Every (mode, algorithm) scenario ``reps`` times (``options``: :func:`late_peer`'s)."""
    results = {}
    for mode in ("eager", "graph"):
        for algorithm in ALGORITHMS:
            runs = []
            for _ in range(reps):
                runs.append(late_peer(mode, algorithm, stall_rank, **options))
            results[f"{mode}/{algorithm}"] = runs
    return results


def stalls_mid_call(algorithm: str, stall_rank: int, *, fail_stop: bool = True, timeout: float = 0.2,
                    stall: float = 0.6, calls: int = 8, stall_at: int = 3) -> list[str]:
    """``calls`` eager all-reduces enqueued back to back (fresh inputs, no sync between them);
    ``stall_rank``'s kernel of call ``stall_at`` stalls *between two of its barriers*.

    The peers give up at their last barrier, where they have already posted
    their arrival, and their next call overwrites the staging buffer that the
    stalled rank has yet to read: without fail-stop's last check the stalled
    rank passes that barrier and keeps a torn sum (``fail_stop=False`` shows
    it: the one-shot's outcome there is ``wrong``).
    """
    import torch

    ctx, comm = custom(algorithm, timeout=timeout, on_error="raise", fail_stop=fail_stop,
                       test_stall=(stall_rank, stall_at, stall))
    rank, world = ctx.info.rank, ctx.info.world_size
    n = NBYTES[algorithm] // 4
    xs = [torch.full((n,), float(rank + 1 + i), device="cuda") for i in range(calls)]
    outs = [torch.zeros_like(x) for x in xs]
    ctx.coordinator.barrier()
    launched = 0
    for x, out in zip(xs, outs):
        if error_of(lambda: comm.all_reduce(x, out=out)) is not None:
            break
        launched += 1
    torch.cuda.synchronize()
    outcomes = [outcome(out, torch.full_like(out, float(world * (world + 1) // 2 + world * i)))
                for i, out in enumerate(outs[:launched])]
    outcomes += ["raised"] * (calls - launched)
    ctx.coordinator.barrier()
    comm.close()
    return outcomes


def dies_mid_call(victim: int, log: str) -> None:
    """``victim`` SIGKILLs itself right after enqueueing an all-reduce; the others keep calling."""
    import signal

    import torch

    ctx, comm = custom("one_shot", timeout=5.0)
    rank, world = ctx.info.rank, ctx.info.world_size
    x = torch.empty(16384, device="cuda")
    out = torch.empty_like(x)
    for i in range(1000):
        x.fill_(float(rank + 1 + i))
        expected = torch.full_like(x, float(world * (world + 1) // 2 + world * i))
        torch.cuda._sleep(100_000)
        comm.all_reduce(x, out=out)
        if rank == victim and i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        torch.cuda.synchronize()
        with open(log, "a") as f:
            f.write(json.dumps([rank, i, outcome(out, expected), time.time()]) + "\n")


def counters_across_the_wrap(calls: int) -> tuple[int, dict]:
    """Counters set just below 2^32, then ``calls`` exact all-reduces of every algorithm across it."""
    import random

    import torch

    ctx = distrib.init()
    rank, world = ctx.info.rank, ctx.info.world_size
    comms = {alg: custom(alg)[1] for alg in ALGORITHMS}
    start = (1 << 32) - calls // 4
    for comm in comms.values():
        comm._engine.set_counters_for_test(start, start)
    rng = random.Random(3)
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    for i in range(calls):
        algorithm = ALGORITHMS[i % 3]
        dtype = (torch.float32, torch.bfloat16, torch.float16)[rng.randrange(3)]
        n = 16 * rng.randint(1, NBYTES[algorithm] // 16) // dtype.itemsize
        base = torch.arange(n, device="cuda", dtype=torch.float32) % 13 - 6 + i % 5
        x = (base * (rank + 1)).to(dtype)
        out = torch.empty_like(x)
        comms[algorithm].all_reduce(x, out=out)
        wrong += (out != (base * (world * (world + 1) // 2)).to(dtype)).sum()
    torch.cuda.synchronize()
    after = {}
    for algorithm, comm in comms.items():
        comm.check()
        epochs, lamport_calls = comm._engine.read_counters_for_test()
        after[algorithm] = (epochs[0], lamport_calls[0])  # block 0 runs in every call
        comm.close()
    return int(wrong.item()), after


def two_streams(calls: int) -> int:
    """Calls alternate between two streams (one of them delayed on the GPU); all exact."""
    import random

    import torch

    ctx = distrib.init()
    rank, world = ctx.info.rank, ctx.info.world_size
    comms = {alg: custom(alg)[1] for alg in ALGORITHMS}
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    rng = random.Random(9)
    delay = random.Random(50 + rank)
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    keep = []
    for i in range(calls):
        stream = streams[rng.randrange(2)]
        algorithm = ALGORITHMS[rng.randrange(3)]
        n = NBYTES[algorithm] // 4
        with torch.cuda.stream(stream):
            if delay.random() < 0.3:
                torch.cuda._sleep(delay.randrange(1000, 50_000))
            x = torch.full((n,), float(rank + 1 + i % 7), device="cuda")
            out = torch.empty_like(x)
            comms[algorithm].all_reduce(x, out=out)
            wrong_here = (out != float(world * (world + 1) // 2 + world * (i % 7))).sum()
        keep.append((x, out))  # no reuse of memory another stream may still read
        torch.cuda.current_stream().wait_stream(stream)
        wrong += wrong_here
        if len(keep) > 64:
            torch.cuda.synchronize()
            keep.clear()
    torch.cuda.synchronize()
    for comm in comms.values():
        comm.check()
        comm.close()
    return int(wrong.item())


def replay_before_registration() -> dict:
    """A graph replayed inside capture() (before registration), and a capture whose
    registration fails (ranks captured different numbers of all-reduces)."""
    import torch

    ctx, comm = custom("one_shot", timeout=5.0, on_error="raise")
    rank = ctx.info.rank
    x = torch.ones(16384, device="cuda")
    out = torch.zeros_like(x)
    report: dict[str, Optional[str]] = {}
    with comm.capture():
        comm.all_reduce(x, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            comm.all_reduce(x, out=out)
        graph.replay()  # too early: the slot is empty
        torch.cuda.synchronize()
        report["early"] = "nan" if bool(torch.isnan(out).any()) else "not nan"
        report["early_check"] = error_of(comm.check)
    comm.close()

    ctx2, comm2 = custom("one_shot", timeout=5.0, on_error="raise")
    graph = torch.cuda.CUDAGraph()
    try:
        with comm2.capture():
            comm2.all_reduce(x, out=out)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for _ in range(1 + rank):  # ranks capture different numbers: registration fails
                    comm2.all_reduce(x, out=out)
        report["register"] = None
    except distrib.CommunicatorError as exc:
        report["register"] = str(exc)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    report["after_failed_registration"] = "nan" if bool(torch.isnan(out).any()) else "not nan"
    report["late_check"] = error_of(comm2.check)
    ctx2.coordinator.barrier()
    comm2.close()
    return report


def mismatched_limits() -> Optional[str]:
    """Rank 1 asks for another max_bytes: every rank must refuse, naming both."""
    from distrib.communicator.custom import CustomAllReduceCommunicator

    ctx = distrib.init()
    max_bytes = (2 << 20) if ctx.info.rank == 1 else (1 << 20)
    return error_of(lambda: CustomAllReduceCommunicator(ctx.coordinator, ctx.device, max_bytes=max_bytes).close())
