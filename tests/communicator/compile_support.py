"""Workers for the torch.compile tests, importable by rank processes (CPU and GPU tests share them).

Every check uses small integers held in float32 (weights and inputs in
-2..2), so every sum is exact whatever its order: eager, compiled, CUDA-graph
replays and the unsplit (TP=1) model must agree bit for bit, and a missing or
doubled all-reduce is off by whole numbers.

Each worker returns plain data (bools, numbers, strings) and the tests assert on it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import distrib
from distrib import communicator

HIDDEN, INTERMEDIATE, TOKENS = 32, 64, 8


def integers(shape, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=generator).float().to(device)


class TensorParallelMLP(torch.nn.Module):
    """Two blocks of a column-parallel then row-parallel MLP; one all-reduce per block.

    Rank ``r`` of ``tp`` holds rows ``r`` of the up projections (column-parallel)
    and the matching columns of the down projections (row-parallel), so each
    block's output is a partial sum until the all-reduce. ``comm=None`` is the
    unsplit model (TP=1). ``out_of_place`` selects ``all_reduce(y, out=...)``
    over the in-place form (whose result is used through the mutated tensor).
    """

    def __init__(self, comm, rank: int, tp: int, device, out_of_place: bool = False):
        super().__init__()
        self.comm, self.out_of_place = comm, out_of_place
        self.up, self.down = [], []
        for block in range(2):
            up = integers((INTERMEDIATE, HIDDEN), 10 + block, device)
            down = integers((HIDDEN, INTERMEDIATE), 20 + block, device)
            self.up.append(up.chunk(tp, 0)[rank].contiguous())
            self.down.append(down.chunk(tp, 1)[rank].contiguous())
        self.bias = integers((HIDDEN,), 30, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in zip(self.up, self.down):
            y = F.linear(torch.relu(F.linear(x, up)), down)   # this rank's partial sum
            if self.comm is not None:
                if self.out_of_place:
                    y = self.comm.all_reduce(y, out=torch.empty_like(y))
                else:
                    self.comm.all_reduce(y)                     # in place; y is now the whole sum
            x = torch.relu(y + self.bias)
        return x * 2


def _graph_ops(graphs) -> list:
    return [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"
            and "distrib" in str(node.target)]


def compiled_mlp(device: str = "cpu", order: Optional[Sequence[str]] = None,
                 backends: Sequence[str] = ("aot_eager", "inductor"), calls: int = 3) -> dict:
    """The TP MLP eager, unsplit and compiled per backend and form; what each gave, and how it compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs
    from torch._dynamo.utils import counters

    ctx = distrib.init()
    rank, tp = ctx.rank, ctx.world_size
    dev = torch.device("cuda", ctx.device) if device == "cuda" else torch.device("cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # the ranks share the machine's cores
    else:
        torch.cuda.set_device(dev)
    comm = communicator.create(ctx.coordinator, device=ctx.device if device == "cuda" else "cpu", order=order)
    inputs = [integers((TOKENS, HIDDEN), 100 + i, dev) for i in range(calls)]
    whole = TensorParallelMLP(None, 0, 1, dev)
    expected = [whole(x) for x in inputs]
    result: dict = {"chain": [c.name for c in comm.chain],
                    "member": getattr(comm.communicator_for(torch.empty(TOKENS, HIDDEN, device=dev)), "name", None)}
    for form in ("in_place", "out_of_place"):
        model = TensorParallelMLP(comm, rank, tp, dev, out_of_place=form == "out_of_place")
        result[f"eager/{form}"] = all(torch.equal(model(x), e) for x, e in zip(inputs, expected))
        for backend in backends:
            torch._dynamo.reset()
            counters.clear()
            recorder = EagerAndRecordGraphs()
            counter = CompileCounterWithBackend(backend)
            traced = torch.compile(model, fullgraph=True, backend=recorder)
            compiled = torch.compile(model, fullgraph=True, backend=counter)
            traced(inputs[0])
            got = [compiled(x) for x in inputs]
            result[f"{backend}/{form}"] = {
                "equal": all(torch.equal(g, e) for g, e in zip(got, expected)),
                "max_abs_diff": max((g - e).abs().max().item() for g, e in zip(got, expected)),
                "frames": counter.frame_count,            # one graph, compiled once for every call
                "graph_breaks": sum(counters["graph_break"].values()),
                "recompiles": sum(counters["recompiles"].values()),
                "ops": _graph_ops(recorder.graphs),
            }
    # Eager calls after compiling still take the direct path, and agree.
    model = TensorParallelMLP(comm, rank, tp, dev)
    result["eager_after"] = all(torch.equal(model(x), e) for x, e in zip(inputs, expected))
    ctx.coordinator.barrier()
    comm.close()
    return result


def compiled_collectives(backends: Sequence[str] = ("aot_eager", "inductor")) -> dict:
    """all_gather, reduce_scatter (with and without out), all_reduce ops and broadcast, compiled."""
    ctx = distrib.init()
    rank, ws = ctx.rank, ctx.world_size
    torch.set_num_threads(1)
    comm = communicator.create(ctx.coordinator, device="cpu")
    x = integers((4, 6), 200 + rank, "cpu")
    everyone = torch.stack([integers((4, 6), 200 + r, "cpu") for r in range(ws)])

    def collectives(x):
        gathered = comm.all_gather(x * 1)                               # (ws, 4, 6)
        flat = comm.all_gather(x * 1, out=torch.empty(ws * x.numel()))  # ws * 24 elements
        scattered = comm.reduce_scatter(x * 1)                          # (4 // ws, 6)
        maxed = comm.reduce_scatter(x * 1, "max", out=torch.empty(x.numel() // ws))
        mean = comm.all_reduce(x * 1, op=communicator.ReduceOp.AVG)
        root = comm.broadcast(x * 1, src=ws - 1)
        return gathered, flat, scattered, maxed, mean, root

    chunk = 4 // ws
    expected = (everyone, everyone.reshape(-1),
                everyone.sum(0)[rank * chunk:(rank + 1) * chunk],
                everyone.amax(0).reshape(-1).chunk(ws)[rank],
                everyone.sum(0) / ws, everyone[ws - 1])
    result = {"eager": all(torch.equal(g, e) for g, e in zip(collectives(x), expected))}
    for backend in backends:
        torch._dynamo.reset()
        got = torch.compile(collectives, fullgraph=True, backend=backend)(x)
        result[backend] = [bool(torch.equal(g, e)) and g.shape == e.shape for g, e in zip(got, expected)]
    comm.close()
    return result


def _error(fn, *args) -> dict:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 — reported to the test
        chain, cause = [], exc
        while cause is not None:
            chain.append(type(cause).__name__)
            cause = cause.__cause__
        return {"raised": True, "types": chain, "message": str(exc)}
    return {"raised": False}


def bad_inputs() -> dict:
    """Trace-time and call-time errors for a closed communicator and tensors it cannot take."""
    ctx = distrib.init()
    torch.set_num_threads(1)
    comm = communicator.create(ctx.coordinator, device="cpu")
    closed = communicator.create(ctx.coordinator, device="cpu")
    closed.close()
    closed_later = communicator.create(ctx.coordinator, device="cpu")
    result = {}

    def compile_(fn):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="aot_eager")

    result["closed_at_trace"] = _error(compile_(lambda x: closed.all_reduce(x + 1)), torch.ones(4))
    result["other_device"] = _error(compile_(lambda x: comm.all_reduce(x + 1)), torch.ones(4, device="meta"))
    result["bad_out"] = _error(compile_(lambda x: comm.all_reduce(x + 1, out=torch.empty(3))), torch.ones(4))
    result["bad_op"] = _error(compile_(lambda x: comm.all_reduce(x + 1, op="median")), torch.ones(4))
    result["indivisible"] = _error(compile_(lambda x: comm.reduce_scatter(x + 1)), torch.ones(3))
    # Compiled while open, called after close: a Python exception at call time, on every rank alike.
    later = compile_(lambda x: closed_later.all_reduce(x + 1))
    result["before_close"] = later(torch.ones(4)).tolist()
    closed_later.close()
    result["closed_at_call"] = _error(later, torch.ones(4))
    # The communicator still works after all of that.
    result["still_works"] = comm.all_reduce(torch.ones(4)).tolist()
    comm.close()
    return result


def run_everything_on_cpu() -> dict:
    """Every CPU check in one launch (rank start-up and torch imports paid once)."""
    return {"mlp": compiled_mlp(), "collectives": compiled_collectives(), "bad": bad_inputs()}


# -- GPU: compiled code captured in CUDA graphs ------------------------------------------------

def compiled_cuda_graphs(order: Optional[Sequence[str]] = None, replays: int = 4) -> dict:
    """The compiled MLP in CUDA graphs, both patterns; each replay with fresh inputs against the unsplit model.

    - ``manual``: ``torch.compile(model, fullgraph=True)``, warmed up eagerly on a side
      stream, then captured with ``torch.cuda.graph`` inside ``comm.capture()`` (the custom
      kernel reads the captured tensors directly; their addresses are registered when the
      block ends, before the first replay). The in-place and the out-of-place model, one graph each.
    - ``reduce_overhead``: ``torch.compile(model, mode="reduce-overhead", fullgraph=True)``,
      called as usual, outside ``comm.capture()`` (inductor captures and replays on its own;
      the custom kernel stages its input through its registered buffer, as eager calls do).
    """
    ctx = distrib.init()
    rank, tp = ctx.rank, ctx.world_size
    dev = torch.device("cuda", ctx.device)
    torch.cuda.set_device(dev)
    comm = communicator.create(ctx.coordinator, device=ctx.device, order=order)
    whole = TensorParallelMLP(None, 0, 1, dev)
    fresh = [integers((TOKENS, HIDDEN), 700 + i, dev) for i in range(replays)]
    result: dict = {"member": comm.communicator_for(torch.empty(TOKENS, HIDDEN, device=dev)).name}

    steps = {form: torch.compile(TensorParallelMLP(comm, rank, tp, dev, out_of_place=form == "out_of_place"),
                                 fullgraph=True) for form in ("in_place", "out_of_place")}
    static_x = integers((TOKENS, HIDDEN), 600, dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for step in steps.values():
            for _ in range(2):
                step(static_x)
    torch.cuda.current_stream(dev).wait_stream(side)
    graphs = {}
    with comm.capture():
        for form, step in steps.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = step(static_x)
            graphs[form] = (graph, static_y)
    for form, (graph, static_y) in graphs.items():
        exact = []
        for x in fresh:
            static_x.copy_(x)
            graph.replay()
            exact.append(bool(torch.equal(static_y, whole(x))))
        result[f"manual/{form}"] = exact
    torch.cuda.synchronize(dev)
    del graphs

    torch._dynamo.reset()
    step = torch.compile(TensorParallelMLP(comm, rank, tp, dev, out_of_place=True), mode="reduce-overhead",
                         fullgraph=True)
    exact = []
    for x in fresh + fresh:  # the first calls warm up and record; every call returns the exact result
        exact.append(bool(torch.equal(step(x).clone(), whole(x))))
    result["reduce_overhead"] = exact
    torch.cuda.synchronize(dev)
    ctx.coordinator.barrier()  # every rank done with the graphs before any closes (IPC mappings)
    comm.close()
    return result
