"""Host side of the custom P2P all-reduce (kernels/custom_all_reduce.cuh).

:class:`CustomAllReduceEngine` owns the IPC-shared buffers of one rank, the
peers' opened buffers, the compiled kernels and the graph-buffer registry.
It works on raw device pointers; the Communicator in ``custom.py`` adapts
tensors to it and decides which calls it may take.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import CommunicatorError

logger = logging.getLogger("distrib.communicator.custom")

__all__ = ["CustomAllReduceEngine", "SUPPORTED_WORLD_SIZES", "KERNEL_TYPES", "Algorithm"]

SUPPORTED_WORLD_SIZES = (2, 4, 6, 8)
MAX_RANKS = 8
MAX_BLOCKS = 128  # DISTRIB_MAX_BLOCKS in the .cuh
THREADS = 512
PACK_BYTES = 16
SIGNAL_BYTES = 8192  # sizeof(Signal) = 4768, rounded up so staging starts aligned
CONTEXT_FORMAT = "<Q8Q8QQQii8Q"  # struct Context in the .cuh, field by field
LAMPORT_BLOCKS = 8  # DISTRIB_LAMPORT_BLOCKS in the .cuh
LAMPORT_COPIES = 3
LAMPORT_CLASSES = 2  # float32 sentinels, 16-bit sentinels
RANK_DATA_BYTES = 8 * MAX_RANKS
GRAPH_SLOTS = 16384  # registered inputs across all captures of one communicator
KERNEL_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}

# cudaHostAllocMapped, cudaIpcMemLazyEnablePeerAccess
_HOST_ALLOC_MAPPED = 2
_IPC_LAZY_PEER_ACCESS = 1


class Algorithm:
    LAMPORT = "lamport_one_shot"
    ONE_SHOT = "one_shot"
    TWO_SHOT = "two_shot"


ALGORITHMS = (Algorithm.LAMPORT, Algorithm.ONE_SHOT, Algorithm.TWO_SHOT)


@dataclass(frozen=True)
class Limits:
    """Size limits in bytes. Calls above ``max_bytes`` are not ours (NCCL takes them)."""

    max_bytes: int
    lamport_max_bytes: int
    one_shot_max_bytes: int
    max_blocks: int


def kernel_source_dir() -> Path:
    """The folder that holds custom_all_reduce.cuh (the repo's kernels/, or installed data)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "kernels", here.parents[1] / "kernels"):
        if (candidate / "custom_all_reduce.cuh").exists():
            return candidate
    raise CommunicatorError(
        "kernels/custom_all_reduce.cuh was not found next to the distrib package; reinstall "
        "distrib from a full source tree")


class CustomAllReduceEngine:
    """IPC buffers, kernels and graph registration for one rank of one node."""

    def __init__(self, coordinator, device: int, max_bytes: int, lamport_max_bytes: int,
                 one_shot_max_bytes: int, timeout_s: float, max_blocks: int = 36):
        import cupy

        self._cupy = cupy
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.device = device
        self.limits = Limits(max_bytes=_round_up(max_bytes, PACK_BYTES),
                             lamport_max_bytes=_round_up(lamport_max_bytes, PACK_BYTES),
                             one_shot_max_bytes=one_shot_max_bytes,
                             max_blocks=max(1, min(max_blocks, MAX_BLOCKS)))
        self._launcher = _Launcher()
        self._coordinator = coordinator
        self._closed = False
        self._opened: dict[bytes, int] = {}  # peer IPC handle -> opened base pointer
        self._pending: list[tuple[int, int]] = []  # (slot, input pointer) captured, not yet registered
        self._next_slot = 1  # slot 0 holds the staging buffers
        self._registering = 0

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            self._module = _compile(self.world_size)
            # CUfunction handles, for the ctypes launcher.
            self._kernels = {(alg, t): self._module.get_function(
                f"distrib::{alg}<{k}, {self.world_size}>").kernel.ptr
                for alg in ALGORITHMS for t, k in KERNEL_TYPES.items()}
            self._p2p_test = self._module.get_function("distrib::p2p_write_test")

            slot_bytes = max(PACK_BYTES, self.limits.lamport_max_bytes)
            lamport_bytes = LAMPORT_COPIES * LAMPORT_CLASSES * self.world_size * slot_bytes
            lamport_offset = SIGNAL_BYTES + 2 * self.limits.max_bytes
            self._base = rt.malloc(lamport_offset + lamport_bytes)
            rt.memset(self._base, 0, SIGNAL_BYTES)
            _fill_sentinels(self._base + lamport_offset, lamport_bytes)
            self._error_host = rt.hostAlloc(8, _HOST_ALLOC_MAPPED)
            ctypes.memset(self._error_host, 0, 8)
            self._error = (ctypes.c_uint32 * 2).from_address(self._error_host)
            # Mapped pinned memory: with unified addressing the host address
            # is also the device address.
            error_dev = self._error_host
            rt.deviceSynchronize()

            handle = bytes(rt.ipcGetMemHandle(self._base))
            handles = coordinator.all_gather(handle)
            bases = []
            for peer, peer_handle in enumerate(handles):
                bases.append(self._base if peer == self.rank else self._open(peer_handle))
            self._bases = bases
            staging = [b + SIGNAL_BYTES for b in bases]
            scratch = [b + SIGNAL_BYTES + self.limits.max_bytes for b in bases]
            lamport = [b + lamport_offset for b in bases]

            pad = [0] * (MAX_RANKS - self.world_size)
            context = struct.pack(CONTEXT_FORMAT, self._base, *(bases + pad), *(scratch + pad),
                                  error_dev, int(timeout_s * 1e9), self.rank,
                                  slot_bytes // PACK_BYTES, *(lamport + pad))
            self._context = rt.malloc(len(context))
            _copy_to_device(self._context, context)
            self._rank_data = rt.malloc(GRAPH_SLOTS * RANK_DATA_BYTES)
            self._write_slot(0, staging)
            rt.deviceSynchronize()

    # -- set-up helpers ----------------------------------------------------------
    def _open(self, handle: bytes) -> int:
        if handle not in self._opened:
            self._opened[handle] = self._cupy.cuda.runtime.ipcOpenMemHandle(handle, _IPC_LAZY_PEER_ACCESS)
        return self._opened[handle]

    def _write_slot(self, slot: int, pointers: list[int]) -> None:
        data = struct.pack(f"<{MAX_RANKS}Q", *(pointers + [0] * (MAX_RANKS - len(pointers))))
        _copy_to_device(self._rank_data + slot * RANK_DATA_BYTES, data)

    def check_p2p(self) -> Optional[str]:
        """Write through every opened peer mapping and have the owner read it back.

        Returns None if every pair works, else a reason naming the failing pairs.
        Collective: every rank calls it.
        """
        cupy = self._cupy
        rt = cupy.cuda.runtime
        pattern = 0x5EED0000 + self.world_size
        with cupy.cuda.Device(self.device):
            self._p2p_test((1,), (32,), (self._context, self.world_size, cupy.uint32(pattern)))
            rt.deviceSynchronize()
        self._coordinator.barrier()
        with cupy.cuda.Device(self.device):
            words = (ctypes.c_uint32 * (MAX_RANKS * 4))()
            rt.memcpy(ctypes.addressof(words), self._base + _P2P_CHECK_OFFSET, ctypes.sizeof(words),
                      rt.memcpyDeviceToHost)
        bad = [writer for writer in range(self.world_size)
               if words[writer * 4] != (pattern ^ self.rank)]
        verdicts = self._coordinator.all_gather(json.dumps(bad).encode())
        failures = [(writer, owner) for owner, v in enumerate(verdicts) for writer in json.loads(v)]
        if failures:
            pairs = ", ".join(f"{w}->{o}" for w, o in failures)
            return f"P2P writes through CUDA IPC did not arrive for rank pairs {pairs}"
        return None

    # -- calls ---------------------------------------------------------------------
    def algorithm(self, nbytes: int) -> str:
        limits = self.limits
        if nbytes <= limits.lamport_max_bytes:
            return Algorithm.LAMPORT
        if nbytes <= limits.one_shot_max_bytes:
            return Algorithm.ONE_SHOT
        return Algorithm.TWO_SHOT

    def launch(self, dtype: str, inp: int, out: int, nbytes: int, stream_ptr: int,
               registered: bool, algorithm: Optional[str] = None) -> str:
        """Enqueue one all-reduce on ``stream_ptr``. Returns the algorithm used.

        ``registered``: the call is being captured and peers will read ``inp``
        itself once :meth:`register_graph_buffers` has run; otherwise the
        kernel stages ``inp`` into this rank's buffer first.
        """
        if self._error[0]:
            raise self._timeout_error()
        alg = algorithm or self.algorithm(nbytes)
        packs = nbytes // PACK_BYTES
        if alg == Algorithm.LAMPORT:
            # Pushes the input itself: needs neither staging nor registration.
            if nbytes > self.limits.lamport_max_bytes:
                raise CommunicatorError(f"{nbytes} bytes exceed the Lamport slot "
                                        f"({self.limits.lamport_max_bytes} bytes)")
            self._launcher(self._kernels[(alg, dtype)], LAMPORT_BLOCKS, self._context, 0, inp, out,
                           packs, stream_ptr)
            return alg
        per_block = packs if alg == Algorithm.ONE_SHOT else -(-packs // self.world_size)
        blocks = max(1, min(self.limits.max_blocks, -(-per_block // THREADS)))
        if registered:
            slot = self._next_slot
            if slot >= GRAPH_SLOTS:
                raise CommunicatorError(
                    f"more than {GRAPH_SLOTS - 1} all-reduces captured on one custom communicator; "
                    "create a new communicator for further graphs")
            self._next_slot += 1
            self._pending.append((slot, inp))
            data, source = self._rank_data + slot * RANK_DATA_BYTES, 0
        else:
            data, source = self._rank_data, inp
        self._launcher(self._kernels[(alg, dtype)], blocks, self._context, data, source, out,
                       packs, stream_ptr)
        return alg

    def register_graph_buffers(self) -> int:
        """Exchange the IPC addresses of every input captured since the last call.

        Collective (one all_gather for the whole capture). Returns how many
        inputs were registered.
        """
        rt = self._cupy.cuda.runtime
        pending, self._pending = self._pending, []
        mine = []
        with self._cupy.cuda.Device(self.device):
            for slot, ptr in pending:
                base, offset = _allocation_of(ptr)
                mine.append((slot, bytes(rt.ipcGetMemHandle(base)), offset, ptr))
        everyone = self._coordinator.all_gather(_pack_registrations(mine))
        tables = [_unpack_registrations(blob) for blob in everyone]
        if len({len(t) for t in tables}) != 1:
            counts = ", ".join(f"rank {r}: {len(t)}" for r, t in enumerate(tables))
            raise CommunicatorError(
                f"ranks captured different numbers of custom all-reduces ({counts}); every rank "
                "must capture the same sequence of all-reduces")
        with self._cupy.cuda.Device(self.device):
            for i, (slot, _, _, ptr) in enumerate(mine):
                pointers = []
                for peer, table in enumerate(tables):
                    peer_slot, handle, offset, _ = table[i]
                    if peer_slot != slot:
                        raise CommunicatorError("ranks disagree on the order of captured all-reduces")
                    pointers.append(ptr if peer == self.rank else self._open(handle) + offset)
                self._write_slot(slot, pointers)
            rt.deviceSynchronize()
        return len(mine)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        self._registering += 1
        try:
            yield
        finally:
            self._registering -= 1

    @property
    def registering(self) -> bool:
        return self._registering > 0

    def check(self) -> None:
        """Raise if a kernel of this communicator gave up waiting for a peer."""
        if self._error[0]:
            raise self._timeout_error()

    def _timeout_error(self) -> CommunicatorError:
        peer, block = self._error[0] - 1, self._error[1]
        return CommunicatorError(
            f"custom all-reduce on rank {self.rank} gave up waiting for rank {peer} (block {block}): "
            f"rank {peer} never arrived. It is hung, dead, or called a different sequence of "
            "all-reduces. The communicator is unusable; the launch should stop.")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        rt = self._cupy.cuda.runtime
        try:
            with self._cupy.cuda.Device(self.device):
                rt.deviceSynchronize()
                for ptr in self._opened.values():
                    rt.ipcCloseMemHandle(ptr)
                for ptr in (self._rank_data, self._context):
                    rt.free(ptr)
                # Peers may still have our exported buffer open (closing is not
                # collective), and freeing exported memory before every importer
                # closed its handle is undefined behaviour (cudaIpcOpenMemHandle's
                # contract). So it lives until the process ends, when the driver
                # reclaims it with the context: one buffer per closed communicator.
                _exported_until_exit.append(self._base)
                rt.freeHost(self._error_host)
        except Exception as exc:  # closing must not raise from a broken context
            logger.warning("custom all-reduce: error while freeing buffers: %s", exc)
        self._opened.clear()


_exported_until_exit: list[int] = []  # buffers of closed engines that peers may still map

# Offset of Signal::p2p_check: arrive[MAX_BLOCKS][MAX_RANKS] u32 + epoch[MAX_BLOCKS] u32.
_P2P_CHECK_OFFSET = 4 * MAX_BLOCKS * MAX_RANKS + 4 * MAX_BLOCKS


def _compile(world_size: int):
    """NVRTC-compile the kernels for this world size (CuPy caches the result on disk)."""
    import cupy

    source_dir = kernel_source_dir()
    code = (source_dir / "custom_all_reduce.cu").read_text()
    names = [f"distrib::{alg}<{k}, {world_size}>" for alg in ALGORITHMS
             for k in KERNEL_TYPES.values()] + ["distrib::p2p_write_test"]
    options = ("--std=c++17", f"-I{source_dir}")
    try:
        module = cupy.RawModule(code=code, options=options, name_expressions=names)
        module.compile()
    except Exception as exc:
        raise CommunicatorError(f"compiling the custom all-reduce kernels failed: {exc}") from exc
    return module


class _Launcher:
    """cuLaunchKernel through ctypes, with the argument block built once.

    CuPy's generic launch path converts every argument on every call (about
    14 µs per launch measured on H200 hosts); an eager all-reduce that should
    cost little more than the kernel cannot afford that. The five kernel
    arguments live in fixed ctypes cells; a launch updates them and makes one
    foreign call. Kernels are enqueued on the caller's stream.
    """

    def __init__(self):
        self._cuda = _driver()
        self._ctx, self._data, self._inp, self._out = (ctypes.c_uint64() for _ in range(4))
        self._packs = ctypes.c_int32()
        cells = (self._ctx, self._data, self._inp, self._out, self._packs)
        self._params = (ctypes.c_void_p * 5)(*[ctypes.addressof(c) for c in cells])

    def __call__(self, function: int, blocks: int, ctx: int, data: int, inp: int, out: int,
                 packs: int, stream: int) -> None:
        self._ctx.value, self._data.value, self._inp.value, self._out.value = ctx, data, inp, out
        self._packs.value = packs
        status = self._cuda.cuLaunchKernel(function, blocks, 1, 1, THREADS, 1, 1, 0, stream,
                                           self._params, None)
        if status:
            raise CommunicatorError(f"launching the custom all-reduce kernel failed: {_cu_error(status)}")


def _driver():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _libcuda = lib
    return _libcuda


def _cu_error(status: int) -> str:
    text = ctypes.c_char_p()
    _driver().cuGetErrorString(status, ctypes.byref(text))
    return f"CUresult {status} ({(text.value or b'?').decode()})"


def _fill_sentinels(ptr: int, nbytes: int) -> None:
    """Pre-fill the Lamport region: copy c, class k -> the sentinel word of class k."""
    import cupy

    words = cupy.ndarray((LAMPORT_COPIES, LAMPORT_CLASSES, nbytes // 4 // (LAMPORT_COPIES * LAMPORT_CLASSES)),
                         dtype=cupy.uint32,
                         memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, nbytes, None), 0))
    words[:, 0, :] = 0x80000000
    words[:, 1, :] = 0x80008000


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _copy_to_device(dst: int, data: bytes) -> None:
    """Synchronous host-to-device copy of ``data`` (pageable source: safe to drop after)."""
    import cupy

    buf = ctypes.create_string_buffer(data, len(data))
    rt = cupy.cuda.runtime
    rt.memcpy(dst, ctypes.addressof(buf), len(data), rt.memcpyHostToDevice)


_libcuda = None


def _allocation_of(ptr: int) -> tuple[int, int]:
    """(base of the cudaMalloc allocation holding ``ptr``, offset of ``ptr`` in it)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = _driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise CommunicatorError(f"cuMemGetAddressRange failed for a captured input: {_cu_error(status)}")
    return base.value, ptr - base.value


def _pack_registrations(entries) -> bytes:
    import msgpack

    return msgpack.packb([[slot, handle, offset] for slot, handle, offset, _ in entries])


def _unpack_registrations(blob: bytes):
    import msgpack

    return [(slot, bytes(handle), offset, None) for slot, handle, offset in msgpack.unpackb(blob)]


def p2p_cache_path(bus_ids: list[str]) -> Path:
    key = hashlib.sha256(json.dumps(sorted(bus_ids)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("DISTRIB_CACHE_DIR", Path.home() / ".cache" / "distrib"))
    return root / f"p2p-{key}.json"
