"""Send and receive through CUDA IPC, between the ranks of one node.

Each rank shares one buffer of mailboxes and slots with its peers; a send
kernel writes the message into the receiver's slots, a recv kernel copies it
out, and counters in device memory hand each chunk over (the argument is in
``kernels/ipc_send_recv.cuh``). It runs between ranks on different GPUs of a
node and between ranks sharing one GPU, where NCCL refuses to run; on the
caller's current stream, and inside CUDA graphs (a captured send pairs with
a captured recv on the peer). Any dtype, any size (a message larger than the
slots streams through them; above ``max_bytes`` the dispatcher hands it to
NCCL where NCCL runs). It does no collectives: the dispatcher sends those on.

Fail-stop as in the custom all-reduce: a kernel waits at most ``timeout``
seconds for its peer, then stops the communicator on every rank and a
watchdog ends the process naming the peer (``on_error="abort"``), or every
later call raises (``"raise"``); a recv that gave up leaves NaN (all-ones
bytes) where it received nothing.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ..errors import CommunicatorError
from . import _ipc
from ._custom_all_reduce import ON_ERROR
from ._tensors import stream_of
from .api import Collective, Communicator, DeviceType, DType, TensorView, communicators

__all__ = ["IpcCommunicator"]

DISABLE_VAR = "DISTRIB_DISABLE_IPC"
# Keyed by a view's dtype, Optional for the type checker only: the views the hooks get have
# passed the checks, so their dtype is one of these.
_DTYPE_CODES: dict[Optional[DType], int] = {dtype: code for code, dtype in enumerate(DType)}


@communicators.register("ipc")
class IpcCommunicator(Communicator):
    """send/recv of any dtype over CUDA IPC, on one node (ranks on one GPU too).

    Options: ``max_bytes`` (the largest message it takes; default 256 MiB,
    ``DISTRIB_IPC_MAX_BYTES``), ``chunk_bytes`` (the most bytes one of its 8
    lanes hands over at once; default 64 KiB; each rank holds
    ``16 * world_size`` slots of it), ``timeout`` (seconds a kernel waits for
    its peer; default 30, ``DISTRIB_IPC_TIMEOUT``), ``on_error`` (``"abort"``,
    the default, or ``"raise"``; ``DISTRIB_CUSTOM_ON_ERROR`` as for the
    custom all-reduce). Every rank must pass the same options.
    """

    name = "ipc"
    priority = 150  # after the custom all-reduce (which does no send/recv), before NCCL
    device_type = DeviceType.CUDA
    dtypes = frozenset(DType)
    ops = frozenset()
    device: int  # never None: unavailable_reason refuses device=None before start-up

    def __init__(self, coordinator, device=None, *, debug: Optional[bool] = None,
                 max_bytes: Optional[int] = None, chunk_bytes: int = 64 << 10,
                 timeout: Optional[float] = None, on_error: Optional[str] = None):
        self._engine: Any = None  # an IpcSendRecvEngine, once started
        self._options = (max_bytes, chunk_bytes, timeout, on_error)
        super().__init__(coordinator, device, debug=debug)

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        from ._ipc_send_recv import MAX_RANKS

        if os.environ.get(DISABLE_VAR, "") not in ("", "0"):
            return f"disabled by {DISABLE_VAR}"
        if not 2 <= coordinator.world_size <= MAX_RANKS and coordinator.nnodes == 1:
            return f"send/recv needs 2 to {MAX_RANKS} ranks, not {coordinator.world_size}"
        return _ipc.unavailable_reason(coordinator, device)

    def _make_token(self) -> bytes:
        return b"ipc"  # IPC handles are exchanged in _initialize; no id to share

    def _initialize(self, token: bytes) -> None:
        from ._ipc_send_recv import IpcSendRecvEngine

        bus_ids = _ipc.agree_on_peer_access(self.coordinator, self.device)
        max_bytes, chunk_bytes, timeout, on_error = self._options
        self.max_bytes = int(max_bytes if max_bytes is not None
                             else os.environ.get("DISTRIB_IPC_MAX_BYTES", 256 << 20))
        timeout = float(timeout if timeout is not None else os.environ.get("DISTRIB_IPC_TIMEOUT", 30.0))
        on_error = on_error if on_error is not None else os.environ.get("DISTRIB_CUSTOM_ON_ERROR", "abort")
        if on_error not in ON_ERROR:
            raise CommunicatorError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
        _agree_on_options(self.coordinator, (self.max_bytes, chunk_bytes))
        self._engine = IpcSendRecvEngine(self.coordinator, self.device, chunk_bytes, timeout, on_error,
                                         tuple(d.value for d in DType))
        _ipc.check_p2p(self.coordinator, bus_ids, self._engine.check_p2p)

    def _check_limits(self, collective: Collective, view: TensorView, op) -> Optional[str]:
        if not collective.is_point_to_point:
            return f"ipc does only send and recv, not {collective}"
        if view.nbytes > self.max_bytes:
            return f"{view.nbytes} bytes exceed its max_bytes ({self.max_bytes})"
        return None

    def _send(self, view: TensorView, dst: int) -> None:
        self._engine.launch("send", dst, view.ptr, view.nbytes, _DTYPE_CODES[view.dtype], stream_of(view))

    def _recv(self, view: TensorView, src: int) -> None:
        self._engine.launch("recv", src, view.ptr, view.nbytes, _DTYPE_CODES[view.dtype], stream_of(view))

    def check(self) -> None:
        """Raise :class:`CommunicatorError` if a kernel of this communicator gave up, on any rank."""
        self._engine.check()

    def _close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


def _agree_on_options(coordinator, options: tuple) -> None:
    """Every rank must cut messages alike and take the same sizes (else sends and recvs differ)."""
    import json

    from .._text import rank_list

    everyone = [tuple(json.loads(r)) for r in coordinator.all_gather(json.dumps(list(options)).encode())]
    if len(set(everyone)) > 1:
        groups: dict = {}
        for rank, theirs in enumerate(everyone):
            groups.setdefault(theirs, []).append(coordinator.ranks[rank])
        described = "; ".join(f"{rank_list(r)}: max_bytes={o[0]}, chunk_bytes={o[1]}" for o, r in groups.items())
        raise CommunicatorError(f"ranks disagree on the IPC send/recv's options ({described}); pass the same "
                                "options and DISTRIB_IPC_MAX_BYTES on every rank")
