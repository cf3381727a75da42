"""Workers for the fused all-reduce + residual add + RMSNorm tests (CPU and GPU tests share them).

Every rank builds every rank's ``x`` from one seed, so each can compute the
unfused reference itself: the float32 sum in rank order rounded to the dtype
(what ``all_reduce`` gives), PyTorch's ``residual + reduced`` in the dtype,
then RMSNorm in float32 rounded once. ``residual`` must match bit for bit;
the normalised output is compared in units in the last place of its dtype.
Workers return plain data; the tests assert on it.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

import distrib
from distrib import communicator

EPS = 1e-6
FORMS = ("in_place", "out", "residual_out", "both")


def inputs(tokens: int, hidden: int, dtype: torch.dtype, world: int, seed: int):
    """(every rank's x, residual, weight), the same on every rank, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    return xs, residual, weight


def reference(xs: Sequence[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float = EPS):
    """(normalised x, residual) as the unfused sequence gives them, computed on the CPU."""
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()  # float32, rank order
    new_residual = residual + total.to(residual.dtype)
    r = new_residual.float()
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(residual.dtype), new_residual


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in units in the last place of their dtype (NaN: a huge number)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    bits = torch.int32 if a.element_size() == 4 else torch.int16
    low = -(1 << (8 * a.element_size() - 1))

    def ordered(t):
        i = t.view(bits).to(torch.int64)
        return torch.where(i < 0, low - i, i)

    if not a.numel():
        return 0
    distance = (ordered(a) - ordered(b)).abs()
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    distance[nan_a & nan_b] = 0  # NaN is NaN, whatever its payload
    distance[nan_a != nan_b] = 1 << 40
    return int(distance.max())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def call(comm, form: str, x, residual, weight, eps: float = EPS):
    """The fused call in one of FORMS; returns (out, residual_out, the untouched inputs were kept)."""
    x0, r0 = x.clone(), residual.clone()
    out = torch.empty_like(x) if form in ("out", "both") else None
    residual_out = torch.empty_like(residual) if form in ("residual_out", "both") else None
    got_x, got_r = comm.all_reduce_add_rms_norm(x, residual, weight, eps, out=out, residual_out=residual_out)
    kept = ((out is None or torch.equal(x, x0)) and (residual_out is None or torch.equal(residual, r0))
            and got_x is (x if out is None else out) and got_r is (residual if residual_out is None else residual_out))
    return got_x, got_r, kept


def eager_cases(comm, device, shapes: Sequence[tuple[int, int]], dtypes: Sequence[str],
                forms: Sequence[str] = FORMS, seed: int = 0) -> list[dict]:
    """Each (dtype, shape, form): residual bitwise, the output's ulps, digests to compare across ranks."""
    rank, world = comm.rank, comm.world_size
    found = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens, hidden in shapes:
            xs, residual, weight = inputs(tokens, hidden, dtype, world, seed + 7919 * tokens + hidden)
            want_x, want_r = reference(xs, residual, weight)
            for form in forms:
                got_x, got_r, kept = call(comm, form, xs[rank].to(device, copy=True), residual.to(device, copy=True),
                                          weight.to(device))
                found.append({"case": f"{dtype_name} {tokens}x{hidden} {form}",
                              "residual_equal": bool(torch.equal(got_r.cpu(), want_r)),
                              "ulps": ulps(got_x, want_x), "kept": kept,
                              "digest": _digest(got_x) + _digest(got_r)})
    return found


def compiled_cases(comm, device, backends: Sequence[str] = ("aot_eager", "inductor")) -> dict:
    """The fused call inside torch.compile(fullgraph=True): the same results as eagerly, one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs
    from torch._dynamo.utils import counters

    rank, world = comm.rank, comm.world_size
    found = {}

    def in_place(x, residual, weight):
        x, residual = comm.all_reduce_add_rms_norm(x * 1, residual, weight, EPS)
        return x + 0, residual

    def out_of_place(x, residual, weight):
        return comm.all_reduce_add_rms_norm(x, residual, weight, EPS, out=torch.empty_like(x),
                                            residual_out=torch.empty_like(residual))

    for name, fn in (("in_place", in_place), ("out_of_place", out_of_place)):
        for backend in backends:
            torch._dynamo.reset()
            counters.clear()
            recorder, counter = EagerAndRecordGraphs(), CompileCounterWithBackend(backend)
            traced = torch.compile(fn, fullgraph=True, backend=recorder)
            compiled = torch.compile(fn, fullgraph=True, backend=counter)
            ok = True
            for i in range(3):
                xs, residual, weight = inputs(4, 64, torch.bfloat16, world, 500 + i)
                want_x, want_r = reference(xs, residual, weight)
                if i == 0:
                    traced(xs[rank].to(device, copy=True), residual.to(device, copy=True), weight.to(device))
                res = residual.to(device, copy=True)
                got_x, got_r = compiled(xs[rank].to(device, copy=True), res, weight.to(device))
                ok = ok and torch.equal(got_r.cpu(), want_r) and ulps(got_x, want_x) <= 1
                if name == "in_place":  # the caller's residual was updated in place
                    ok = ok and torch.equal(res.cpu(), want_r)
            found[f"{backend}/{name}"] = {
                "right": bool(ok), "frames": counter.frame_count,
                "graph_breaks": sum(counters["graph_break"].values()),
                "ops": [str(n.target) for gm in recorder.graphs for n in gm.graph.nodes
                        if n.op == "call_function" and "distrib" in str(n.target)]}
    return found


def bad_calls(comm, device) -> dict:
    """What each bad call raised (type and message)."""
    x = torch.ones(2, 16, device=device)
    r, w = torch.ones_like(x), torch.ones(16, device=device)
    cases = {
        "weight_shape": lambda: comm.all_reduce_add_rms_norm(x, r, torch.ones(8, device=device)),
        "residual_dtype": lambda: comm.all_reduce_add_rms_norm(x, r.half(), w),
        "int_dtype": lambda: comm.all_reduce_add_rms_norm(x.int(), r.int(), w.int()),
        "out_overlaps_residual": lambda: comm.all_reduce_add_rms_norm(x, r, w, out=r),
        "negative_eps": lambda: comm.all_reduce_add_rms_norm(x, r, w, -1.0),
        "not_a_tensor": lambda: comm.all_reduce_add_rms_norm(x, [1.0], w),
        "not_contiguous": lambda: comm.all_reduce_add_rms_norm(torch.ones(16, 2, device=device).t(), r, w),
    }
    found = {}
    for name, fn in cases.items():
        try:
            fn()
            found[name] = "no error"
        except Exception as exc:  # noqa: BLE001 — the test reads the type and the message
            found[name] = f"{type(exc).__name__}: {exc}"
    return found


def run_on_cpu(order: Optional[Sequence[str]] = None) -> dict:
    """Every CPU check in one launch."""
    ctx = distrib.init()
    torch.set_num_threads(1)
    comm = communicator.create(ctx.coordinator, device="cpu", order=order)
    x = torch.ones(2, 16)
    result = {
        "eager": eager_cases(comm, "cpu", [(1, 64), (7, 40), (3, 1024)], ("float32", "bfloat16", "float16")),
        "why_unfused": comm.can_all_reduce_add_rms_norm(x, x.clone(), torch.ones(16)),
        "bad": bad_calls(comm, "cpu"),
        "compiled": compiled_cases(comm, "cpu"),
    }
    ctx.coordinator.barrier()
    comm.close()
    return result
