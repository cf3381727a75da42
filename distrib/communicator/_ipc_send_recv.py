"""Host side of the CUDA IPC send/recv (kernels/ipc_send_recv.cuh).

:class:`IpcSendRecvEngine` owns one rank's IPC-shared mailbox and slots, the
peers' opened ones, the two compiled kernels and the fail-stop watchdog. It
works on raw device pointers; the Communicator in ``ipc.py`` adapts tensors
to it.
"""
from __future__ import annotations

import logging
import struct
from typing import Optional

from ..errors import CommunicatorError
from ._cuda_driver import SendRecvLauncher
from ._ipc import (ErrorRecordOwner, IpcHandles, StreamOrder, Watchdog, copy_to_device, is_capturing, keep_until_exit,
                   kernel_source_dir, mapped_error_record, write_through_peers)

logger = logging.getLogger("distrib.communicator.ipc")

__all__ = ["IpcSendRecvEngine", "MAX_RANKS", "LANES", "chunk_size"]

# As in kernels/ipc_send_recv.cuh (checked against it by the layout test).
MAX_RANKS = 16
LANES = 8
DEPTH = 2
MIN_CHUNK = 4096
HEADER_BYTES = 16
THREADS = 512
_COUNTERS = MAX_RANKS * LANES  # u32 words in each of ready, freed, sent, taken
READY_OFFSET, FREED_OFFSET, SENT_OFFSET, TAKEN_OFFSET = (4 * _COUNTERS * i for i in range(4))
P2P_CHECK_OFFSET = 4 * 4 * _COUNTERS
POISON_OFFSET = P2P_CHECK_OFFSET + 4 * MAX_RANKS * 4
MAILBOX_BYTES = 4096  # sizeof(Mailbox) rounded up, so that the slots start aligned
CONTEXT_FORMAT = f"<Q{MAX_RANKS}Q{MAX_RANKS}QQQiiii"  # struct IpcContext, field by field

# enum IpcErrorKind
_SEND_TIMEOUT, _POISONED, _RECV_TIMEOUT, _MISMATCH = 1, 2, 3, 4
_CALL_IDS = 1 << 32
_RECENT_CALLS = 4096  # eager calls remembered for error messages


def chunk_size(nbytes: int, chunk_bytes: int) -> int:
    """The chunk size of an n-byte message: about n / LANES, at least 4 KiB, at most ``chunk_bytes``."""
    per_lane = -(-nbytes // LANES)
    per_lane = -(-per_lane // 16) * 16
    return min(max(per_lane, MIN_CHUNK), chunk_bytes)


class IpcSendRecvEngine(ErrorRecordOwner):
    """One rank's end of every send/recv channel of a communicator, through CUDA IPC.

    ``chunk_bytes``: the most bytes a lane moves per hand-over (a multiple of
    16); each rank holds ``world * LANES * 2`` slots of that size for the
    chunks peers send it. ``timeout_s``: how long a kernel waits for its peer.
    ``on_error``: ``"abort"`` (a kernel that gave up ends the process with a
    report) or ``"raise"`` (every later call raises).
    ``dtype_names[code]`` names the element types the caller passes as codes.
    """

    def __init__(self, coordinator, device: int, chunk_bytes: int, timeout_s: float, on_error: str,
                 dtype_names: tuple):
        import cupy

        if not 2 <= coordinator.world_size <= MAX_RANKS:
            raise CommunicatorError(f"IPC send/recv takes 2 to {MAX_RANKS} ranks, not {coordinator.world_size}")
        if chunk_bytes % 16 or chunk_bytes < MIN_CHUNK:
            raise CommunicatorError(f"chunk_bytes={chunk_bytes} must be a multiple of 16, at least {MIN_CHUNK}")
        self._cupy = cupy
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.on_error = on_error
        self._dtype_names = dtype_names
        self._names = tuple(coordinator.ranks)  # rank here -> global rank
        self._scope = "" if coordinator.is_world else f" of {coordinator.describe()}"
        self._coordinator = coordinator
        self._closed = False
        self._handles = IpcHandles()
        self._orders: dict[tuple[str, int], StreamOrder] = {}  # (direction, peer) -> its launches' order
        self._launcher = SendRecvLauncher(THREADS)
        self._call = 0
        self._recent: list = [None] * _RECENT_CALLS  # eager call id % _RECENT_CALLS -> description
        self._captured: dict[int, tuple] = {}  # captured call id -> description

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            self._module = _compile()
            self._kernels = {name: self._module.get_function(f"distrib::ipc::{name}").kernel.ptr
                             for name in ("send", "recv")}
            self._write_test = self._module.get_function("distrib::ipc::write_test")
            slot_stride = HEADER_BYTES + chunk_bytes
            self._base = rt.malloc(MAILBOX_BYTES + self.world_size * LANES * DEPTH * slot_stride)
            rt.memset(self._base, 0, MAILBOX_BYTES)
            self._error_host, self.error = mapped_error_record()
            rt.deviceSynchronize()
            replies = coordinator.all_gather(bytes(rt.ipcGetMemHandle(self._base)).hex().encode())
            bases = [self._base if peer == self.rank else self._handles.open(bytes.fromhex(r.decode()))
                     for peer, r in enumerate(replies)]
            pad = [0] * (MAX_RANKS - self.world_size)
            context = struct.pack(CONTEXT_FORMAT, self._base, *(bases + pad),
                                  *([b + MAILBOX_BYTES for b in bases] + pad), self._error_host,
                                  int(timeout_s * 1e9), self.rank, self.world_size, chunk_bytes, 0)
            self._context = rt.malloc(len(context))
            copy_to_device(self._context, context)
            rt.deviceSynchronize()
        self._watchdog = Watchdog(self, "IPC send/recv")

    # -- calls ---------------------------------------------------------------------
    def launch(self, direction: str, peer: int, ptr: int, nbytes: int, dtype: int, stream: int) -> None:
        """Enqueue sending ``nbytes`` at ``ptr`` to ``peer`` (``direction`` "send"), or receiving
        them from ``peer`` into ``ptr`` ("recv"), on ``stream``."""
        if self.error[0]:
            raise self.failure()
        order = self._orders.get((direction, peer))
        if order is None:
            order = self._orders[(direction, peer)] = StreamOrder(self.device)
        order.follow(stream)
        chunk = chunk_size(nbytes, self.chunk_bytes)
        blocks = min(LANES, -(-nbytes // chunk))
        call = self._call
        self._call = (call + 1) % _CALL_IDS
        description = (direction, peer, nbytes, dtype)
        if is_capturing(stream):
            self._captured[call] = description
        else:
            self._recent[call % _RECENT_CALLS] = description
        self._launcher(self._kernels[direction], blocks, self._context, peer, ptr, nbytes, dtype, call, stream)

    def check_p2p(self) -> Optional[str]:
        """Write through every opened peer mapping and have the owner read it back (collective)."""
        cupy = self._cupy

        def write(pattern: int) -> None:
            self._write_test((1,), (32,), (self._context, cupy.uint32(pattern)))

        return write_through_peers(self._coordinator, self.device, write, self._base + P2P_CHECK_OFFSET,
                                   self._names)

    # -- failures -------------------------------------------------------------------
    def describe_failure(self) -> str:
        who, call, kind = self.error[0] - 1, self.error[2], self.error[3]
        what = self._call_text(call)
        name = self._name
        if kind == _SEND_TIMEOUT:
            cause = (f"gave up after {self.timeout_s:g}s in {what}: rank {name(who)} did not take what "
                     f"this rank sent (it is hung, dead, or made no matching recv)")
        elif kind == _RECV_TIMEOUT:
            cause = (f"gave up after {self.timeout_s:g}s in {what}: rank {name(who)} sent nothing (it is hung, "
                     "dead, or made no matching send)")
        elif kind == _MISMATCH:
            # ErrorRecord's unused[0..2] (after its claim word): the sender's size and dtype.
            nbytes = self.error[5] | (self.error[6] << 32)
            theirs = self._dtype_name(self.error[7])
            cause = (f"refused {what}: rank {name(who)} sent {nbytes} bytes of {theirs}; a send and its recv "
                     "need the same size and dtype")
        elif kind == _POISONED:
            stopper, waited = (who & 0xFFFF) - 1, (who >> 16) - 1
            cause = f"was stopped before {what}: rank {name(stopper)} had given up on rank {name(waited)}"
        else:
            cause = f"failed (error kind {kind}, rank {name(who)}) in {what}"
        return (f"IPC send/recv on rank {name(self.rank)}{self._scope} {cause}. The communicator is stopped "
                "on every rank: later sends and recvs raise, and a recv replayed from a graph writes NaN.")

    def _name(self, rank: int) -> str:
        return str(self._names[rank]) if 0 <= rank < len(self._names) else f"#{rank}"

    def _dtype_name(self, code: int) -> str:
        return self._dtype_names[code] if 0 <= code < len(self._dtype_names) else f"dtype #{code}"

    def _call_text(self, call: int) -> str:
        captured = call in self._captured
        described = self._captured.get(call) or self._recent[call % _RECENT_CALLS]
        if described is None:
            return f"send/recv #{call}"
        direction, peer, nbytes, dtype = described
        where = "a graph replay of captured " if captured else ""
        towards = "to" if direction == "send" else "from"
        return (f"{where}{direction} #{call} {towards} rank {self._name(peer)} ({nbytes} bytes of "
                f"{self._dtype_name(dtype)})")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watchdog.stop()
        rt = self._cupy.cuda.runtime
        try:
            with self._cupy.cuda.Device(self.device):
                rt.deviceSynchronize()
                self._handles.close()
                rt.free(self._context)
                for order in self._orders.values():
                    order.close()
                keep_until_exit(self._base, self._error_host)
        except Exception as exc:  # closing must not raise from a broken context
            logger.warning("IPC send/recv: error while freeing buffers: %s", exc)


def _compile():
    """NVRTC-compile the send/recv kernels (CuPy caches the result on disk)."""
    import cupy

    source_dir = kernel_source_dir()
    code = (source_dir / "ipc_send_recv.cu").read_text()
    names = ["distrib::ipc::send", "distrib::ipc::recv", "distrib::ipc::write_test"]
    try:
        module = cupy.RawModule(code=code, options=("--std=c++17", f"-I{source_dir}"), name_expressions=names)
        module.compile()
    except Exception as exc:
        raise CommunicatorError(f"compiling the IPC send/recv kernels failed: {exc}") from exc
    return module
