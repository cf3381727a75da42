"""The fused all-reduce + residual add + RMSNorm: its checks, and the unfused sequence.

``comm.all_reduce_add_rms_norm(x, residual, weight, eps)`` means, as vLLM's
``fused_add_rms_norm`` after a tensor-parallel all-reduce::

    residual += all_reduce(x)                                  # rounded to the dtype, as two ops would
    x = residual * rsqrt(mean(residual ** 2, -1) + eps) * weight   # in float32, rounded once

both in place (or into ``out`` / ``residual_out``), returning ``(x, residual)``.
A communicator with a fused kernel (the custom all-reduce) runs it as one
kernel; every other path runs :func:`unfused`: the communicator's all-reduce,
then PyTorch ops. ``residual`` comes out bitwise the same either way.

Everything here takes torch tensors only (RMSNorm is a PyTorch op here).
:func:`shape_problem` reads shapes, dtypes and devices alone, so that the
fake implementation of the compiled operator runs it too.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

from ..errors import CommunicatorError
from ._tensors import as_view
from ._types import TensorView

__all__ = ["FusedCall", "check", "shape_problem", "unfused"]

NAME = "all_reduce_add_rms_norm"
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


class FusedCall(NamedTuple):
    """One checked call: its tensors (``out``/``residual_out`` are the tensors written, the
    inputs themselves for the in-place form) and ``row_bytes``, the bytes of one row."""

    view: TensorView  # of x
    x: Any
    residual: Any
    weight: Any
    eps: float
    out: Any
    residual_out: Any
    row_bytes: int

    @property
    def in_place(self) -> bool:
        return self.out is self.x


def shape_problem(x: Any, residual: Any, weight: Any, eps: Any, out: Any = None,
                  residual_out: Any = None) -> Optional[str]:
    """What is wrong with the call, from shapes, dtypes and devices alone; None if nothing."""
    import torch

    named = {"x": x, "residual": residual, "weight": weight, "out": out, "residual_out": residual_out}
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            return f"{name} must be a torch tensor, got {type(t).__name__}"
    if x.dim() < 1 or x.shape[-1] == 0:
        return f"x must be [tokens, hidden] with hidden > 0, got shape {list(x.shape)}"
    dtype = str(x.dtype).replace("torch.", "")
    if dtype not in FLOAT_DTYPES:
        return f"x has dtype {dtype}; the fused RMSNorm takes {', '.join(FLOAT_DTYPES)}"
    hidden = x.shape[-1]
    for name, t, shape in (("residual", residual, x.shape), ("weight", weight, (hidden,)),
                           ("out", out, x.shape), ("residual_out", residual_out, x.shape)):
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            return f"{name} has shape {list(t.shape)}, expected {list(shape)} (x is {list(x.shape)})"
        if t.dtype != x.dtype:
            return f"{name} has dtype {str(t.dtype).replace('torch.', '')}, expected {dtype} like x"
        if t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    for name, t in named.items():
        if t is not None and not t.is_contiguous():
            return f"{name} is not contiguous; pass {name}.contiguous()"
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        return f"eps={eps!r} must be a finite number >= 0"
    return None


def check(comm: Any, x: Any, residual: Any, weight: Any, eps: Any, out: Any,
          residual_out: Any) -> FusedCall:
    """The call, checked; raises :class:`CommunicatorError` naming what to change."""
    problem = shape_problem(x, residual, weight, eps, out, residual_out)
    if problem is None:
        out = x if out is None or _same(out, x) else out
        residual_out = residual if residual_out is None or _same(residual_out, residual) else residual_out
        problem = _overlap_problem({"x": x, "residual": residual, "weight": weight},
                                   {"out": out, "residual_out": residual_out})
    if problem is not None:
        raise CommunicatorError(f"{comm.name} {NAME}: {problem}")
    return FusedCall(as_view(x), x, residual, weight, float(eps), out, residual_out,
                     x.shape[-1] * x.element_size())


def unfused(comm: Any, call: FusedCall) -> None:
    """The sequence the fused kernel replaces: ``comm``'s all-reduce, then PyTorch's add and RMSNorm."""
    import torch

    reduced = comm._eager_all_reduce(call.x, "sum", None if call.in_place else call.out)
    if call.residual_out is call.residual:
        call.residual.add_(reduced)
    else:
        torch.add(call.residual, reduced, out=call.residual_out)
    r = call.residual_out.float()
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + call.eps) * call.weight.float()
    reduced.copy_(normed)


def _same(a: Any, b: Any) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _overlap_problem(inputs: dict, outputs: dict) -> Optional[str]:
    """Outputs may be their own input (in place) but must not overlap any other tensor."""
    tensors = {**inputs, **outputs}
    names = list(tensors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in outputs and b not in outputs:
                continue  # inputs may share memory (only written through the outputs)
            ta, tb = tensors[a], tensors[b]
            if (a, b) in (("x", "out"), ("residual", "residual_out")) and _same(ta, tb):
                continue  # the in-place form
            if _overlaps(ta, tb):
                return (f"{a} and {b} overlap; pass separate tensors"
                        + (f" (or no {b}, for in place)" if (a, b) in (("x", "out"), ("residual", "residual_out"))
                           else ""))
    return None


def _overlaps(a: Any, b: Any) -> bool:
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + b.numel() * b.element_size() and pb < pa + a.numel() * a.element_size()
