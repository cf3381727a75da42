"""The few CUDA driver calls the custom all-reduce and the IPC send/recv make through ctypes.

CuPy covers the runtime API; these are the driver entry points it does not
expose cheaply: a kernel launch with a prebuilt argument block, occupancy,
and the allocation that holds a pointer. Each C prototype stands above its
binding.
"""
from __future__ import annotations

import ctypes

from ..errors import CommunicatorError

__all__ = ["KernelLauncher", "Norm", "NormLauncher", "SendRecvLauncher", "allocation_of", "max_resident_blocks"]

_libcuda = None


def _driver():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        # CUresult cuMemGetAddressRange(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr)
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        # CUresult cuLaunchKernel(CUfunction f, unsigned gridDimX, gridDimY, gridDimZ,
        #     unsigned blockDimX, blockDimY, blockDimZ, unsigned sharedMemBytes,
        #     CUstream hStream, void** kernelParams, void** extra)
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        # CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, CUfunction func,
        #     int blockSize, size_t dynamicSMemSize)
        lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
            ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        # CUresult cuGetErrorString(CUresult error, const char** pStr)
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _libcuda = lib
    return _libcuda


def _cu_error(status: int) -> str:
    text = ctypes.c_char_p()
    _driver().cuGetErrorString(status, ctypes.byref(text))
    return f"CUresult {status} ({(text.value or b'?').decode()})"


class _Launcher:
    """cuLaunchKernel through ctypes, with the argument block built once.

    CuPy's generic launch path converts every argument on every call (about
    14 µs per launch measured on H200 hosts); an eager call that should cost
    little more than its kernel cannot afford that. A kernel's arguments live
    in fixed ctypes cells; a launch (a subclass's ``__call__``, one per kernel
    signature) updates them and makes one foreign call. Kernels are enqueued
    on the caller's stream.
    """

    def __init__(self, threads: int, cells: tuple, what: str):
        self._cuda = _driver()
        self._threads = threads
        self._what = what
        self._params = (ctypes.c_void_p * len(cells))(*[ctypes.addressof(c) for c in cells])

    def _failed(self, status: int) -> CommunicatorError:
        return CommunicatorError(f"launching the {self._what} kernel failed: {_cu_error(status)}")


class KernelLauncher(_Launcher):
    """The custom all-reduce kernels' launch: ``(ctx, data, in, out, packs, call)``."""

    def __init__(self, threads: int, extra: tuple = (), what: str = "custom all-reduce"):
        self._ctx, self._data, self._inp, self._out = (ctypes.c_uint64() for _ in range(4))
        self._packs = ctypes.c_int32()
        self._call = ctypes.c_uint32()
        super().__init__(threads, (self._ctx, self._data, self._inp, self._out, self._packs, self._call) + extra,
                         what)

    def __call__(self, function: int, blocks: int, ctx: int, data: int, inp: int, out: int,
                 packs: int, call: int, stream: int) -> None:
        self._ctx.value, self._data.value, self._inp.value, self._out.value = ctx, data, inp, out
        self._packs.value = packs
        self._call.value = call
        status = self._cuda.cuLaunchKernel(function, blocks, 1, 1, self._threads, 1, 1, 0, stream,
                                           self._params, None)
        if status:
            raise self._failed(status)


class Norm(ctypes.Structure):
    """``struct Norm`` of the fused kernels (kernels/custom_all_reduce.cuh), passed by value."""

    _fields_ = [("residual_in", ctypes.c_uint64), ("residual_out", ctypes.c_uint64),
                ("weight", ctypes.c_uint64), ("row_packs", ctypes.c_int32), ("eps", ctypes.c_float)]


class NormLauncher(KernelLauncher):
    """The fused all-reduce + residual + RMSNorm kernels: ``(ctx, data, in, out, packs, call, norm)``."""

    def __init__(self, threads: int):
        self._norm = Norm()
        super().__init__(threads, (self._norm,), "fused all-reduce + RMSNorm")

    def launch(self, function: int, blocks: int, ctx: int, data: int, inp: int, out: int, packs: int,
               call: int, stream: int, norm: tuple[int, int, int, int, float]) -> None:
        """``norm``: (residual_in, residual_out, weight, row_packs, eps)."""
        cell = self._norm
        cell.residual_in, cell.residual_out, cell.weight, cell.row_packs, cell.eps = norm
        self(function, blocks, ctx, data, inp, out, packs, call, stream)


class SendRecvLauncher(_Launcher):
    """The IPC send/recv kernels' launch: ``(ctx, peer, ptr, nbytes, dtype, call)``."""

    def __init__(self, threads: int):
        self._ctx, self._ptr, self._nbytes = (ctypes.c_uint64() for _ in range(3))
        self._peer = ctypes.c_int32()
        self._dtype, self._call = ctypes.c_uint32(), ctypes.c_uint32()
        super().__init__(threads, (self._ctx, self._peer, self._ptr, self._nbytes, self._dtype, self._call),
                         "IPC send/recv")

    def __call__(self, function: int, blocks: int, ctx: int, peer: int, ptr: int, nbytes: int, dtype: int,
                 call: int, stream: int) -> None:
        self._ctx.value, self._peer.value, self._ptr.value, self._nbytes.value = ctx, peer, ptr, nbytes
        self._dtype.value, self._call.value = dtype, call
        status = self._cuda.cuLaunchKernel(function, blocks, 1, 1, self._threads, 1, 1, 0, stream,
                                           self._params, None)
        if status:
            raise self._failed(status)


def max_resident_blocks(function: int, threads: int, multiprocessors: int) -> int:
    """How many blocks of ``threads`` threads of ``function`` the whole GPU holds at once."""
    blocks = ctypes.c_int()
    status = _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), function,
                                                                   threads, 0)
    if status:
        raise CommunicatorError(f"reading the custom all-reduce kernel's occupancy failed: {_cu_error(status)}")
    return blocks.value * multiprocessors


def allocation_of(ptr: int) -> tuple[int, int]:
    """(base of the cudaMalloc allocation holding ``ptr``, offset of ``ptr`` in it)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = _driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise CommunicatorError(f"cuMemGetAddressRange failed for a captured input: {_cu_error(status)}")
    return base.value, ptr - base.value
