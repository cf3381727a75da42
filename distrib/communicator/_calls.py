"""The path every data call takes: read the tensor, pick who runs it, check, run.

Shared by every communicator and the dispatcher (which differ only in
``_select``); nothing is enqueued until every check has passed, and in debug
mode until every rank has shown the same call (or its reason to refuse it).
"""
from __future__ import annotations

from typing import Any

from ..errors import CommunicatorError, DistribError
from . import _consensus, _tensors
from .api import Collective, ReduceOp, TensorView


def run(comm, collective: Collective, tensor: Any, op: Any, out: Any, root: int) -> Any:
    """Run ``collective`` on ``tensor`` through ``comm``; returns the object holding the result."""
    if comm._closed:
        raise CommunicatorError(f"this {comm.name} communicator is closed; create a new one")
    try:
        op = ReduceOp.parse(op)
        src = _tensors.as_view(tensor)
        chosen = comm._select(collective, src, op, root)
        dst = _tensors.output_view(collective, src, out, comm.world_size)
    except DistribError as exc:
        if comm.debug:
            _consensus.check_peers(comm, collective, error=str(exc))
        raise
    if comm.debug:
        _consensus.check_peers(comm, collective, signature=(
            collective.value, op.value, src.dtype_name, list(src.shape), root, chosen.name))
    if src.numel:  # nothing to move; every rank skips alike, since shapes match
        _enqueue(chosen, collective, src, dst, op, root)
    return dst.obj


def _enqueue(comm, collective: Collective, src: TensorView, dst: TensorView, op: ReduceOp,
             root: int) -> None:
    if collective is Collective.ALL_REDUCE:
        comm._all_reduce(src, dst, op)
    elif collective is Collective.ALL_GATHER:
        comm._all_gather(src, dst)
    elif collective is Collective.REDUCE_SCATTER:
        comm._reduce_scatter(src, dst, op)
    else:
        comm._broadcast(src, root)
