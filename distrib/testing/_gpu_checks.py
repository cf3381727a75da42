"""The conformance suite's GPU checks: CUDA-graph capture and the caller's stream.

Functions of the running suite (``suite.comm``, ``suite.make``, ``suite.compare`` …);
each returns None when it passed, or the reason it was skipped.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..communicator.api import DeviceType, DType, ReduceOp
from ._arrays import expected, pattern, shape_numel


def _capture_block(comm):
    """``comm.capture()`` where the communicator has it, else nothing to enter."""
    capture = getattr(comm, "capture", None)
    return capture() if capture is not None else contextlib.nullcontext()


def cuda_graph(suite) -> Optional[str]:
    """All-reduces captured in a CUDA graph (torch or CuPy), replayed with new inputs."""
    if not suite.gpu:
        return "CUDA graphs need a GPU communicator"
    if suite.lib.name == "cupy":
        return _cupy_graph(suite)
    if suite.lib.name != "torch":
        return "graph capture is checked with torch and CuPy arrays"
    device = torch.device("cuda", suite.device)
    dtypes = [d for d in (DType.BFLOAT16, DType.FLOAT32) if d in suite.dtypes] or suite.dtypes[:1]
    cases = [(shape, dtype) for shape in ((1024,), (4, 8, 16), (1 << 16,)) for dtype in dtypes]
    xs = [suite.make(ReduceOp.SUM, suite.rank, shape, dtype) for shape, dtype in cases]
    src = suite.make(ReduceOp.SUM, suite.rank, (4096,), dtypes[0])
    out = suite.lib.empty((4096,), dtypes[0])
    graph = torch.cuda.CUDAGraph()
    with _capture_block(suite.comm):  # a communicator may register captured buffers at its end
        side = torch.cuda.Stream(device)  # warm up off the default stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for x in xs:
                suite.comm.all_reduce(x)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            for x in xs:
                suite.comm.all_reduce(x)
            suite.comm.all_reduce(src, out=out)
    for shift in range(3):  # replays see new inputs written into the captured buffers
        for x, (shape, dtype) in zip(xs, cases):
            x.copy_(suite.make(ReduceOp.SUM, suite.rank, shape, dtype, shift))
        src.copy_(suite.make(ReduceOp.SUM, suite.rank, (4096,), dtypes[0], shift))
        graph.replay()
        torch.cuda.synchronize(device)
        for x, (shape, dtype) in zip(xs, cases):
            want = expected(ReduceOp.SUM, suite.ws, shape_numel(shape), dtype) + suite.ws * shift
            suite.compare(x, want, dtype, shape, f"replay {shift} of a captured all_reduce {dtype}{list(shape)}")
        want = expected(ReduceOp.SUM, suite.ws, 4096, dtypes[0]) + suite.ws * shift
        suite.compare(out, want, dtypes[0], (4096,), f"replay {shift} of a captured out-of-place all_reduce")
    del graph
    return None


def _cupy_graph(suite) -> Optional[str]:
    import cupy

    dtype = suite.dtypes[0]
    with cupy.cuda.Device(suite.device):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x = suite.make(ReduceOp.SUM, suite.rank, (1024,), dtype)
            suite.comm.all_reduce(x)  # warm-up, on CuPy's current stream
            stream.synchronize()
            with _capture_block(suite.comm):
                stream.begin_capture()
                suite.comm.all_reduce(x)
                graph = stream.end_capture()
            for shift in range(3):
                x[...] = suite.make(ReduceOp.SUM, suite.rank, (1024,), dtype, shift)
                graph.launch(stream)
                stream.synchronize()
                want = expected(ReduceOp.SUM, suite.ws, 1024, dtype) + suite.ws * shift
                suite.compare(x, want, dtype, (1024,), f"launch {shift} of a CuPy-captured all_reduce")
    return None


def send_recv_graph(suite) -> Optional[str]:
    """A send/recv ring captured in a CUDA graph (torch), replayed with new inputs."""
    if not suite.gpu or suite.lib.name != "torch":
        return "checked with torch tensors on a GPU communicator"
    if suite.ws == 1:
        return "send/recv needs at least 2 ranks"
    device = torch.device("cuda", suite.device)
    after, before = (suite.rank + 1) % suite.ws, (suite.rank - 1) % suite.ws
    probe = torch.zeros(4, device=device)
    member = suite.comm.communicator_for(probe, collective="send") if hasattr(suite.comm, "chain") else suite.comm
    if member is None or member.device_type is DeviceType.CPU:
        name = member.name if member is not None else "no member"
        return f"send/recv of CUDA tensors goes through host memory ({name}), which a CUDA graph cannot capture"
    cases = [((1000,), suite.dtypes[0]), ((3, 1 << 15), suite.dtypes[-1]), (((1 << 20) + 3,), suite.dtypes[0])]
    xs = [suite.make(ReduceOp.SUM, suite.rank, shape, dtype) for shape, dtype in cases]
    ys = [suite.lib.empty(shape, dtype) for shape, dtype in cases]

    def ring():
        for x, y in zip(xs, ys):
            suite._ring(lambda: suite.comm.send(x, after), lambda: suite.comm.recv(y, before))

    graph = torch.cuda.CUDAGraph()
    with _capture_block(suite.comm):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            ring()  # warm-up, eager
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            ring()
    for shift in range(3):
        for x, (shape, dtype) in zip(xs, cases):
            x.copy_(suite.make(ReduceOp.SUM, suite.rank, shape, dtype, shift))
        graph.replay()
        torch.cuda.synchronize(device)
        for y, (shape, dtype) in zip(ys, cases):
            want = pattern(ReduceOp.SUM, before, suite.ws, shape_numel(shape), dtype) + shift
            suite.compare(y, want, dtype, shape, f"replay {shift} of a captured send/recv of {dtype}{list(shape)}")
    del graph
    return None


def caller_stream(suite) -> Optional[str]:
    """Work is ordered on the caller's current stream, not on another one."""
    if not suite.gpu or suite.lib.name != "torch":
        return "checked with torch tensors on a GPU communicator"
    if not hasattr(torch.cuda, "_sleep"):
        return "torch.cuda._sleep is not available"
    device = torch.device("cuda", suite.device)
    stream = torch.cuda.Stream(device)
    x = torch.zeros(4096, dtype=torch.float32, device=device)
    y = torch.zeros(4096, dtype=torch.float32, device=device)
    torch.cuda.synchronize(device)
    after, before = (suite.rank + 1) % suite.ws, (suite.rank - 1) % suite.ws
    with torch.cuda.stream(stream):
        # The fill runs only after a long spin on this stream: a call enqueued
        # anywhere else would read the zeros first.
        torch.cuda._sleep(200_000_000)
        x.fill_(suite.rank + 1)
        if suite.reduces:
            suite.comm.all_reduce(x)
            y.copy_(x)
        else:
            suite._ring(lambda: suite.comm.send(x, after), lambda: suite.comm.recv(y, before))
    stream.synchronize()
    total = suite.ws * (suite.ws + 1) // 2 if suite.reduces else before + 1
    want = torch.full((4096,), float(total), dtype=torch.float64)
    suite.compare(y, want, DType.FLOAT32, (4096,), "a call ordered after a fill on a side stream")
    return None
