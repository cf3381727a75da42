"""GPU scenarios of groups and of CUDA IPC send/recv, for the GPU tests and ``python -m distrib.bench groups``.

Each runs in every rank of a launch (ranks may share GPUs) and returns what
it saw: counts of exact and wrong results, and the messages of the errors
it was meant to meet. Inputs are small integers in bfloat16, so every sum
is exact and any wrong element is a real fault.
"""
from __future__ import annotations

import time
from typing import Optional

import distrib

SIZES = (512, 16 << 10, 256 << 10)  # bfloat16 elements: 1 KiB (Lamport), 32 KiB, 512 KiB


def _custom(coordinator, **options):
    from distrib.communicator.custom import CustomAllReduceCommunicator

    return CustomAllReduceCommunicator(coordinator, distrib.init().device, max_bytes=1 << 20, **options)


class _Checked:
    """All-reduces of one group with inputs that change every call, and their exact expected sums."""

    def __init__(self, group, comm, captured: int):
        import torch

        self.group, self.comm = group, comm
        rank = group.global_rank
        # Rank r's input j: (r % 7 + 1) + (j % 13) + shift, small integers.
        self.sizes = [SIZES[j % len(SIZES)] for j in range(captured)]
        self.base = [torch.full((n,), float(rank % 7 + 1 + j % 13), dtype=torch.bfloat16, device="cuda")
                     for j, n in enumerate(self.sizes)]
        total = sum(r % 7 + 1 for r in group.ranks)
        self.expected = [float(total + group.world_size * (j % 13)) for j in range(captured)]
        self.inputs = [b.clone() for b in self.base]
        self.outputs = [torch.empty_like(b) for b in self.base]
        # Elements that are neither the sum nor NaN (a stopped call's output: fail-stop's signal).
        self.wrong = torch.zeros((), dtype=torch.int64, device="cuda")
        self.nan = torch.zeros((), dtype=torch.int64, device="cuda")
        self.checked = 0

    def eager(self, i: int) -> None:
        """Call ``i``: an in-place or out-of-place all-reduce of input ``i % captured``, checked on the GPU."""
        j = i % len(self.base)
        x = self.inputs[j]
        x.copy_(self.base[j]).add_(i % 5)
        want = self.expected[j] + self.group.world_size * (i % 5)
        if i % 2:
            self.comm.all_reduce(x)
            out = x
        else:
            out = self.comm.all_reduce(x, out=self.outputs[j])
        self._count(out, want)
        self.checked += 1

    def _count(self, out, want: float) -> None:
        import torch

        nan = torch.isnan(out)
        self.wrong += ((out != want) & ~nan).sum()
        self.nan += nan.sum()

    def capture(self):
        import torch

        graph = torch.cuda.CUDAGraph()
        with self.comm.capture():
            with torch.cuda.graph(graph):
                for x, out in zip(self.inputs, self.outputs):
                    self.comm.all_reduce(x, out=out)  # registered: peers read x itself
        return graph

    def replay(self, graph, shift: int) -> None:
        for x, b in zip(self.inputs, self.base):
            x.copy_(b).add_(shift)
        graph.replay()
        for out, want in zip(self.outputs, self.expected):
            self._count(out, want + self.group.world_size * shift)
        self.checked += len(self.outputs)


def concurrent_tp_groups(tp_sizes: tuple = (2, 4), eager_calls: int = 5000, replays: int = 50,
                         captured: int = 100) -> dict:
    """TP groups of every size in ``tp_sizes`` (a layout each), each with its own custom all-reduce,
    driven at the same time on one stream per group: ``eager_calls`` eager calls, then ``replays``
    replays of a graph of ``captured`` all-reduces, every result checked exactly."""
    import torch

    ctx = distrib.init()
    layouts = {tp: distrib.parallel.layout(tp=tp) for tp in tp_sizes}
    runs = {tp: _Checked(layout.tp, _custom(layout.tp), captured) for tp, layout in layouts.items()}
    streams = {tp: torch.cuda.Stream() for tp in tp_sizes}
    graphs = {}
    for tp, run in runs.items():
        with torch.cuda.stream(streams[tp]):
            graphs[tp] = run.capture()
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    started = time.perf_counter()
    for i in range(eager_calls):
        for tp, run in runs.items():  # each group's call on its own stream: they overlap on the GPU
            with torch.cuda.stream(streams[tp]):
                run.eager(i)
    eager_checked = {tp: run.checked for tp, run in runs.items()}
    for shift in range(replays):
        for tp, run in runs.items():
            with torch.cuda.stream(streams[tp]):
                run.replay(graphs[tp], shift)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out = {}
    for tp, run in runs.items():
        run.comm.check()
        out[tp] = {"ranks": run.group.ranks, "eager": eager_checked[tp],
                   "graph": run.checked - eager_checked[tp], "wrong": int(run.wrong.item()),
                   "nan": int(run.nan.item()),
                   "name": run.group.describe()}
        run.comm.close()
    for layout in layouts.values():
        layout.close()
    return {"groups": out, "seconds": seconds}


def late_peer_in_one_group(timeout: float = 2.0, stall: float = 5.0) -> dict:
    """TP=2 on 4 ranks, ``on_error="raise"``: rank 1 (TP group 0) stalls ``stall`` s before its 5th
    call; its peer rank 0 gives up after ``timeout`` s. TP group 1 keeps calling all along."""
    import torch

    ctx = distrib.init()
    layout = distrib.parallel.layout(tp=2)
    comm = _custom(layout.tp, timeout=timeout, on_error="raise")
    run = _Checked(layout.tp, comm, captured=len(SIZES))
    rank = ctx.coordinator.rank
    ctx.coordinator.barrier()
    started = time.monotonic()
    errors: list[str] = []
    calls, first_error_at = 0, None
    while len(errors) < 2:
        # Every 50 calls the group's rank 0 says whether to go on (a group that stopped has left).
        if calls and calls % 50 == 0:
            go = time.monotonic() - started < stall + timeout + 2.0
            if layout.tp.broadcast(b"1" if go else b"0", src=0) == b"0":
                break
        if rank == 1 and calls == 4:
            time.sleep(stall)
        try:
            run.eager(calls)
            torch.cuda.synchronize()
            comm.check()
        except distrib.CommunicatorError as exc:
            errors.append(str(exc))
            first_error_at = first_error_at or time.monotonic() - started
        calls += 1
    wrong, nan = int(run.wrong.item()), int(run.nan.item())
    layout_ranks = layout.tp.ranks
    ctx.coordinator.barrier()
    comm.close()
    layout.close()
    return {"group": layout_ranks, "calls": calls, "checked": run.checked, "wrong": wrong, "nan": nan,
            "errors": errors, "first_error_at": first_error_at}


# -- send/recv -------------------------------------------------------------------------------

def _ipc(coordinator, **options):
    from distrib.communicator.ipc import IpcCommunicator

    return IpcCommunicator(coordinator, distrib.init().device, **options)


# (dtype name, shape, element offset into a larger buffer: 1 gives an address 2 or 4 bytes off 16)
MESSAGES = (("bfloat16", (4096,), 0), ("float32", (3, 1000), 0), ("uint8", (77,), 0),
            ("float16", (8191,), 1), ("int64", (5, 7, 9), 0), ("bfloat16", (3 << 20,), 0),
            ("float32", (1000,), 1))


def _message(torch, dtype: str, shape: tuple, sender: int, round_: int):
    n = 1
    for extent in shape:
        n *= extent
    values = (torch.arange(n, device="cuda") * 7 + sender * 101 + round_ * 13) % 251
    return values.to(getattr(torch, dtype)).reshape(shape)


def ipc_ring(rounds: int = 20, replays: int = 20) -> dict:
    """Every rank sends every message of MESSAGES to the next rank and receives the previous rank's
    (even ranks send first): ``rounds`` eager rounds, then ``replays`` replays of a captured round,
    with fresh data each time. Messages of 6 MiB stream through the slots; some are unaligned."""
    import torch

    ctx = distrib.init()
    coordinator = ctx.coordinator
    rank, world = coordinator.rank, coordinator.world_size
    after, before = (rank + 1) % world, (rank - 1) % world
    comm = _ipc(coordinator)
    sends, recvs = [], []
    for dtype, shape, offset in MESSAGES:
        n = 1
        for extent in shape:
            n *= extent
        whole = torch.empty(n + offset, dtype=getattr(torch, dtype), device="cuda")
        sends.append(whole[offset:].view(shape))
        whole = torch.empty(n + offset, dtype=getattr(torch, dtype), device="cuda")
        recvs.append(whole[offset:].view(shape))
    wrong, checked = [], 0

    def exchange():
        for x, y in zip(sends, recvs):
            if rank % 2 == 0:
                comm.send(x, after)
                comm.recv(y, before)
            else:
                comm.recv(y, before)
                comm.send(x, after)

    def fill_and_check(round_: int, run):
        nonlocal checked
        for x, (dtype, shape, _) in zip(sends, MESSAGES):
            x.copy_(_message(torch, dtype, shape, rank, round_))
        run()
        torch.cuda.synchronize()
        for y, (dtype, shape, offset) in zip(recvs, MESSAGES):
            checked += 1
            if not torch.equal(y, _message(torch, dtype, shape, before, round_)):
                wrong.append(f"round {round_}: {dtype}{list(shape)}+{offset}")

    for round_ in range(rounds):
        fill_and_check(round_, exchange)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            exchange()
    for replay in range(replays):
        fill_and_check(rounds + replay, graph.replay)
    comm.check()
    comm.close()
    return {"checked": checked, "wrong": wrong}


def ipc_never_sends(timeout: float = 2.0) -> Optional[dict]:
    """Rank 1 waits for a message rank 0 never sends (``on_error="raise"``)."""
    import torch

    ctx = distrib.init()
    comm = _ipc(ctx.coordinator, timeout=timeout, on_error="raise")
    rank = ctx.coordinator.rank
    got = torch.zeros(1 << 16, dtype=torch.float32, device="cuda")
    ctx.coordinator.barrier()
    started = time.monotonic()
    if rank == 1:
        comm.recv(got, 0)
        torch.cuda.synchronize()
    else:
        time.sleep(timeout + 1.0)
    # Rank 1 gave up (its next call raises at once); rank 0's next send finds the poison rank 1
    # left in its mailbox, and its check raises.
    def next_call() -> None:
        comm.send(got, 1 - rank)
        torch.cuda.synchronize()
        comm.check()

    seen = _raised(next_call)
    result = {"after": time.monotonic() - started, "next_call": seen,
              "nan": bool(torch.isnan(got).all().item()) if rank == 1 else None}
    ctx.coordinator.barrier()
    comm.close()
    return result


def ipc_size_mismatch() -> dict:
    """Rank 0 sends 1,000 float32; rank 1 receives 2,000 (``on_error="raise"``)."""
    import torch

    ctx = distrib.init()
    comm = _ipc(ctx.coordinator, timeout=5.0, on_error="raise")
    rank = ctx.coordinator.rank
    if rank == 0:
        comm.send(torch.ones(1000, device="cuda"), 1)
    else:
        comm.recv(torch.zeros(2000, device="cuda"), 0)
    torch.cuda.synchronize()
    time.sleep(0.2)
    result = {"check": _raised(comm.check)}
    ctx.coordinator.barrier()
    comm.close()
    return result


def _raised(call) -> Optional[str]:
    try:
        call()
    except distrib.CommunicatorError as exc:
        return str(exc)
    return None
