"""distrib's collectives as PyTorch operators, so that torch.compile can trace them.

While Dynamo traces a function that calls ``comm.all_reduce(x)`` (or another
data call), the call records one of these operators in the graph, with the
communicator's handle (an int, see :mod:`._handles`) instead of the object.
When the compiled code runs, the operator looks the communicator up and makes
the ordinary eager call: operator → the communicator the user called (a
dispatcher picks its member) → that member's kernel. User code is the same
eager and compiled.

The operators, in the ``distrib`` namespace (``Tensor(a!)``: written in place):

- ``all_reduce_(Tensor(a!) tensor, int handle, str op) -> ()``
- ``all_reduce_out(Tensor tensor, Tensor(a!) out, int handle, str op) -> ()``
- ``all_gather_out(Tensor tensor, Tensor(a!) out, int handle) -> ()``
- ``reduce_scatter_out(Tensor tensor, Tensor(a!) out, int handle, str op) -> ()``
- ``broadcast_(Tensor(a!) tensor, int handle, int src) -> ()``
- ``all_reduce_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, int handle) -> ()``
- ``all_reduce_add_rms_norm_out(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) out,
  Tensor(b!) residual_out, int handle) -> ()``

Calls without ``out`` that make a new tensor (``all_gather``,
``reduce_scatter``) allocate it in the graph and use the ``_out`` form.

Their fake implementations run at trace time and check what the shapes alone
tell: the handle names a live, open communicator, which (or a member of the
dispatcher's chain) takes this device, dtype, op and layout, and ``out``
fits. A bad call fails while compiling, with the same message as eagerly;
what only the data can tell is checked by the eager call at run time, which
raises a Python exception there too, never a crash inside compiled code.

Importing this module imports torch and registers the operators (once per process).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import CommunicatorError
from . import _handles, _tensors
from ._types import Collective, ReduceOp

__all__ = ["all_gather", "all_reduce", "all_reduce_add_rms_norm", "broadcast", "reduce_scatter"]

NAMESPACE = "distrib"


# -- what the public data calls record while Dynamo traces them ------------------------------
# Kept to a few plain statements so that Dynamo traces them without a graph break.

def all_reduce(comm, tensor, op, out):
    name = _op_name(op)
    if out is None or out is tensor:
        torch.ops.distrib.all_reduce_.default(tensor, comm.handle, name)
        return tensor
    torch.ops.distrib.all_reduce_out.default(tensor, out, comm.handle, name)
    return out


def all_gather(comm, tensor, out):
    if out is None:
        out = tensor.new_empty((comm.world_size,) + tuple(tensor.shape))
    torch.ops.distrib.all_gather_out.default(tensor, out, comm.handle)
    return out


def reduce_scatter(comm, tensor, op, out):
    if out is None:
        out = tensor.new_empty(_scattered_shape(tuple(tensor.shape), tensor.numel(), comm.world_size))
    torch.ops.distrib.reduce_scatter_out.default(tensor, out, comm.handle, _op_name(op))
    return out


def broadcast(comm, tensor, src):
    torch.ops.distrib.broadcast_.default(tensor, comm.handle, src)
    return tensor


def all_reduce_add_rms_norm(comm, x, residual, weight, eps, out, residual_out):
    if out is None and residual_out is None:
        torch.ops.distrib.all_reduce_add_rms_norm_.default(x, residual, weight, eps, comm.handle)
        return x, residual
    # One result in place, the other not: the out-of-place operator, then a copy back.
    new_out = out if out is not None else torch.empty_like(x)
    new_residual = residual_out if residual_out is not None else torch.empty_like(residual)
    torch.ops.distrib.all_reduce_add_rms_norm_out.default(x, residual, weight, eps, new_out, new_residual,
                                                          comm.handle)
    if out is None:
        x.copy_(new_out)
        return x, new_residual
    if residual_out is None:
        residual.copy_(new_residual)
        return new_out, residual
    return new_out, new_residual


def _op_name(op) -> str:
    # The graph holds a plain str: a ReduceOp member would be written into generated code as its repr.
    return op.value if isinstance(op, ReduceOp) else op


def _scattered_shape(shape: tuple, numel: int, world_size: int) -> tuple:
    """reduce_scatter's result shape without ``out`` (as in :func:`._tensors.output_view`)."""
    if shape and shape[0] % world_size == 0:
        return (shape[0] // world_size,) + shape[1:]
    return (numel // world_size,)


# -- what runs: the eager call, through the communicator the handle names --------------------

# The hot one (small all-reduces in decode loops) skips the public method's
# "is torch.compile tracing?" test: an operator's kernel runs only eagerly.
def _all_reduce_(tensor, handle: int, op: str) -> None:
    _handles.lookup(handle)._eager_all_reduce(tensor, op, None)


def _all_reduce_out(tensor, out, handle: int, op: str) -> None:
    _handles.lookup(handle)._eager_all_reduce(tensor, op, out)


def _all_gather_out(tensor, out, handle: int) -> None:
    _handles.lookup(handle).all_gather(tensor, out=out)


def _reduce_scatter_out(tensor, out, handle: int, op: str) -> None:
    _handles.lookup(handle).reduce_scatter(tensor, op, out=out)


def _broadcast_(tensor, handle: int, src: int) -> None:
    _handles.lookup(handle).broadcast(tensor, src)


def _all_reduce_add_rms_norm_(x, residual, weight, eps: float, handle: int) -> None:
    _handles.lookup(handle)._eager_all_reduce_add_rms_norm(x, residual, weight, eps, None, None)


def _all_reduce_add_rms_norm_out(x, residual, weight, eps: float, out, residual_out, handle: int) -> None:
    _handles.lookup(handle)._eager_all_reduce_add_rms_norm(x, residual, weight, eps, out, residual_out)


# -- trace time: the checks that shapes alone allow ----------------------------------------

def _check(handle: int, collective: Collective, tensor, op: str = "sum", out=None, root: int = 0) -> None:
    comm = _handles.lookup(handle)
    if comm.closed:
        raise CommunicatorError(f"{collective} traced with a closed communicator ({comm!r}); "
                                "create a new one and compile with it")
    parsed = ReduceOp.parse(op)
    view = _tensors.shape_view(tensor)
    reason = comm._reject(collective, view, parsed, root)
    if reason is not None:
        raise CommunicatorError(f"{comm.name} {collective}: {reason}")
    if out is not None:
        problem = _tensors.out_problem(collective, view, _tensors.shape_view(out), comm.world_size,
                                       addresses=False)
        if problem is not None:
            raise CommunicatorError(f"{collective}: out {problem}")


def _check_fused(handle: int, x, residual, weight, eps, out=None, residual_out=None) -> None:
    from . import _fused

    comm = _handles.lookup(handle)
    if comm.closed:
        raise CommunicatorError(f"{_fused.NAME} traced with a closed communicator ({comm!r}); "
                                "create a new one and compile with it")
    problem = _fused.shape_problem(x, residual, weight, eps, out, residual_out)
    if problem is None:
        problem = comm._reject(Collective.ALL_REDUCE, _tensors.shape_view(x), ReduceOp.SUM, 0)
    if problem is not None:
        raise CommunicatorError(f"{comm.name} {_fused.NAME}: {problem}")


def _fake_all_reduce_add_rms_norm_(x, residual, weight, eps, handle):
    _check_fused(handle, x, residual, weight, eps)


def _fake_all_reduce_add_rms_norm_out(x, residual, weight, eps, out, residual_out, handle):
    _check_fused(handle, x, residual, weight, eps, out, residual_out)


def _fake_all_reduce_(tensor, handle, op):
    _check(handle, Collective.ALL_REDUCE, tensor, op)


def _fake_all_reduce_out(tensor, out, handle, op):
    _check(handle, Collective.ALL_REDUCE, tensor, op, out)


def _fake_all_gather_out(tensor, out, handle):
    _check(handle, Collective.ALL_GATHER, tensor, out=out)


def _fake_reduce_scatter_out(tensor, out, handle, op):
    _check(handle, Collective.REDUCE_SCATTER, tensor, op, out)


def _fake_broadcast_(tensor, handle, src):
    _check(handle, Collective.BROADCAST, tensor, root=src)


# -- registration ------------------------------------------------------------------------------

_SCHEMAS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any]]] = {
    "all_reduce_": ("(Tensor(a!) tensor, int handle, str op) -> ()", _all_reduce_, _fake_all_reduce_),
    "all_reduce_out": ("(Tensor tensor, Tensor(a!) out, int handle, str op) -> ()",
                       _all_reduce_out, _fake_all_reduce_out),
    "all_gather_out": ("(Tensor tensor, Tensor(a!) out, int handle) -> ()",
                       _all_gather_out, _fake_all_gather_out),
    "reduce_scatter_out": ("(Tensor tensor, Tensor(a!) out, int handle, str op) -> ()",
                           _reduce_scatter_out, _fake_reduce_scatter_out),
    "broadcast_": ("(Tensor(a!) tensor, int handle, int src) -> ()", _broadcast_, _fake_broadcast_),
    "all_reduce_add_rms_norm_": (
        "(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, int handle) -> ()",
        _all_reduce_add_rms_norm_, _fake_all_reduce_add_rms_norm_),
    "all_reduce_add_rms_norm_out": (
        "(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) out, Tensor(b!) residual_out, "
        "int handle) -> ()", _all_reduce_add_rms_norm_out, _fake_all_reduce_add_rms_norm_out),
}


def _register() -> Any:
    # torch.library.Library rather than torch.library.custom_op: the eager call
    # then goes straight from PyTorch's dispatcher to the Python kernel, without
    # custom_op's wrappers (this is the cost measured by `distrib.bench op-overhead`).
    library = torch.library.Library(NAMESPACE, "DEF")
    for name, (schema, kernel, fake) in _SCHEMAS.items():
        library.define(name + schema)
        # One kernel for every device: the communicator decides what it can take.
        # Registered for CPU and CUDA as well: PyTorch reaches a backend's own
        # kernel faster than the composite one (measured on one H200's host:
        # 1.9 against 3.7 µs per call of an empty Python kernel).
        for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
            library.impl(name, kernel, key)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=library)
    return library


_library = _register()  # kept: the registrations last as long as this object


def operator(name: str) -> Any:
    """The registered operator ``distrib::<name>`` (its default overload)."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
