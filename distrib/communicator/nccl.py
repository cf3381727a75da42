"""NCCL through CuPy (``cupy.cuda.nccl``), on the caller's current CUDA stream.

The master makes the unique id (``ncclGetUniqueId``), the Coordinator hands
it to every rank, and each rank calls ``ncclCommInitRank(world_size, id,
rank)`` on its own device. Data calls pass raw device pointers and the
caller's current stream straight to NCCL: no copies, no host
synchronisation, so they can be captured in a CUDA graph
(``torch.cuda.graph`` or CuPy's stream capture). CuPy is imported only when
this communicator is used; ``cupy-cuda12x`` and ``cupy-cuda13x`` both work.
"""
from __future__ import annotations

from typing import Any, Optional

from ..errors import CommunicatorError
from .._text import counted, rank_list
from ..info import SHARE_GPU_VAR, members_sharing_a_gpu
from .api import Communicator, DeviceType, DType, ReduceOp, TensorView, communicators
from ._tensors import _torch_stream, stream_of

__all__ = ["NcclCommunicator"]

# NCCL's enums keep their C names (nccl.h); the values are NCCL's ABI.
# typedef enum { ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4,
#                ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8,
#                ncclBfloat16 = 9 } ncclDataType_t;
# Keyed by a view's dtype, Optional for the type checker only: the views the hooks get have
# passed the checks, so their dtype is one of these.
ncclDataType_t: dict[Optional[DType], int] = {
    DType.INT8: 0, DType.UINT8: 1, DType.INT32: 2, DType.INT64: 4,
    DType.FLOAT16: 6, DType.FLOAT32: 7, DType.FLOAT64: 8, DType.BFLOAT16: 9}
# typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
ncclRedOp_t = {ReduceOp.SUM: 0, ReduceOp.PROD: 1, ReduceOp.MAX: 2, ReduceOp.MIN: 3, ReduceOp.AVG: 4}

NCCL_UNIQUE_ID_BYTES = 128
ONE_RANK_PER_GPU = ("NCCL refuses two ranks on one GPU (since 2.5: 'Duplicate GPU detected', "
                    "ncclInvalidUsage)")
_FIRST_WITH_BF16_AND_AVG = 21000  # NCCL 2.10.0 (ncclGetVersion: major*10000 + minor*100 + patch)


def _import_nccl():
    """``cupy.cuda.nccl``; raises ImportError with the reason when it cannot be used."""
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise ImportError(
            f"CuPy is not installed or does not load ({exc}); install 'distrib[cuda13]' "
            "(cupy-cuda13x) or 'distrib[cuda12]' (cupy-cuda12x)") from exc
    if not getattr(nccl, "available", False) or not hasattr(nccl, "NcclCommunicator"):
        raise ImportError("CuPy cannot load the NCCL library (libnccl); install NCCL "
                          "(e.g. the nvidia-nccl-cu13 or -cu12 wheel) next to CuPy")
    return nccl


@communicators.register("nccl")
class NcclCommunicator(Communicator):
    """NCCL collectives on one CUDA device per rank, through ``cupy.cuda.nccl``."""

    name = "nccl"
    priority = 100
    device_type = DeviceType.CUDA
    dtypes = frozenset(ncclDataType_t)
    ops = frozenset(ncclRedOp_t)
    device: int  # never None: unavailable_reason refuses device=None before start-up

    def __init__(self, coordinator, device=None, *, debug: Optional[bool] = None):
        self._comm: Any = None  # cupy.cuda.nccl.NcclCommunicator, once started
        self._broken: Optional[str] = None
        super().__init__(coordinator, device, debug=debug)

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        try:
            _import_nccl()
            import cupy
        except ImportError as exc:
            return str(exc)
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 — no driver, no GPU: CuPy raises its own error
            return f"CUDA is not usable here: {exc}"
        if device is None:
            return "no CUDA device was given (pass device=, or launch with devices)"
        if not 0 <= device < count:
            return f"device {device} does not exist; this process sees {counted(count, 'CUDA device')}"
        shared = members_sharing_a_gpu(coordinator.info, coordinator.ranks)
        if shared:
            return (f"{ONE_RANK_PER_GPU}, and {rank_list(shared)} of {coordinator.describe()} share GPUs "
                    f"({SHARE_GPU_VAR})")
        return None

    def _make_token(self) -> bytes:
        nccl = _import_nccl()
        import cupy

        with cupy.cuda.Device(self.device):
            unique_id = nccl.get_unique_id()
        if isinstance(unique_id, bytes):  # CuPy >= 14
            return unique_id
        return bytes(b & 0xFF for b in unique_id)  # older CuPy: 128 C chars as ints in -128..127

    def _initialize(self, token: bytes) -> None:
        nccl = _import_nccl()
        import cupy

        if len(token) != NCCL_UNIQUE_ID_BYTES:
            raise CommunicatorError(f"the NCCL unique id has {len(token)} bytes, expected {NCCL_UNIQUE_ID_BYTES}")
        self._nccl_error = nccl.NcclError
        # Ranks that share a GPU without the launcher saying so: refuse before NCCL does.
        bus_ids = self.coordinator.all_gather(cupy.cuda.runtime.deviceGetPCIBusId(self.device).encode())
        shared = sorted({b.decode() for b in bus_ids if bus_ids.count(b) > 1})
        if shared:
            raise CommunicatorError(f"{ONE_RANK_PER_GPU}; GPU {', '.join(shared)} has several ranks "
                                    f"of {self.coordinator.describe()}")
        self.nccl_version = nccl.get_version()
        if self.nccl_version < _FIRST_WITH_BF16_AND_AVG:
            self.dtypes = self.dtypes - {DType.BFLOAT16}
            self.ops = self.ops - {ReduceOp.AVG}
        with cupy.cuda.Device(self.device):
            try:  # CuPy >= 14 takes the id as bytes ...
                self._comm = nccl.NcclCommunicator(self.world_size, token, self.rank)
            except TypeError:  # ... older CuPy as a tuple of C chars
                unique_id = tuple(b - 256 if b > 127 else b for b in token)
                self._comm = nccl.NcclCommunicator(self.world_size, unique_id, self.rank)

    def _check_limits(self, collective, view: TensorView, op: ReduceOp) -> Optional[str]:
        if self._broken:
            return f"nccl is unusable after an earlier failure ({self._broken})"
        return None

    # -- operations -----------------------------------------------------------
    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        try:
            self._comm.allReduce(src.ptr, dst.ptr, src.numel, ncclDataType_t[src.dtype],
                                 ncclRedOp_t[op], stream_of(src))
        except self._nccl_error as exc:
            self._fail("all_reduce", exc)

    def _torch_all_reduce(self, view: TensorView, op: ReduceOp):
        comm, count, index = self._comm, view.numel, self.device  # the view's device
        dtype, red_op = ncclDataType_t[view.dtype], ncclRedOp_t[op]

        def run(tensor, out) -> None:
            ptr = tensor.data_ptr()
            try:
                comm.allReduce(ptr, ptr if out is None else out.data_ptr(), count, dtype, red_op,
                               _torch_stream(index))
            except self._nccl_error as exc:
                self._fail("all_reduce", exc)
        return run

    def _all_gather(self, src: TensorView, dst: TensorView) -> None:
        try:
            self._comm.allGather(src.ptr, dst.ptr, src.numel, ncclDataType_t[src.dtype], stream_of(src))
        except self._nccl_error as exc:
            self._fail("all_gather", exc)

    def _reduce_scatter(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        try:
            self._comm.reduceScatter(src.ptr, dst.ptr, dst.numel, ncclDataType_t[src.dtype],
                                     ncclRedOp_t[op], stream_of(src))
        except self._nccl_error as exc:
            self._fail("reduce_scatter", exc)

    def _broadcast(self, view: TensorView, src: int) -> None:
        try:
            self._comm.broadcast(view.ptr, view.ptr, view.numel, ncclDataType_t[view.dtype], src,
                                 stream_of(view))
        except self._nccl_error as exc:
            self._fail("broadcast", exc)

    def _send(self, view: TensorView, dst: int) -> None:
        try:
            self._comm.send(view.ptr, view.numel, ncclDataType_t[view.dtype], dst, stream_of(view))
        except self._nccl_error as exc:
            self._fail(f"send to rank {self.coordinator.ranks[dst]}", exc)

    def _recv(self, view: TensorView, src: int) -> None:
        try:
            self._comm.recv(view.ptr, view.numel, ncclDataType_t[view.dtype], src, stream_of(view))
        except self._nccl_error as exc:
            self._fail(f"recv from rank {self.coordinator.ranks[src]}", exc)

    def check_async_error(self) -> None:
        """Raise :class:`CommunicatorError` if NCCL reported an asynchronous error
        (a peer failed, a network error). Cheap; does not wait for the GPU."""
        if self._comm is None:
            return
        try:
            self._comm.check_async_error()
        except self._nccl_error as exc:
            self._fail("an earlier operation", exc)

    def _close(self) -> None:
        comm, self._comm = self._comm, None
        if comm is None:
            return
        # After a failure a peer may be gone; ncclCommDestroy could then wait for it.
        if self._broken:
            comm.abort()
        else:
            comm.destroy()

    def _fail(self, what: str, exc: BaseException):
        self._broken = f"{what} failed: {exc}"
        raise CommunicatorError(
            f"NCCL {what} failed on rank {self.global_rank}{self._on_group} (cuda:{self.device}): {exc}") from exc
