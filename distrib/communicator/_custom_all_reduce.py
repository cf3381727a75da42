"""Host side of the custom P2P all-reduce (kernels/custom_all_reduce.cuh).

:class:`CustomAllReduceEngine` owns the IPC-shared buffers of one rank, the
peers' opened buffers, the compiled kernels, the graph-buffer registry and
the watchdog that stops the process when a kernel gave up (fail-stop). It
works on raw device pointers; the Communicator in ``custom.py`` adapts
tensors to it and decides which calls it may take.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import struct
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from ..errors import CommunicatorError
from ._cuda_driver import KernelLauncher, NormLauncher, allocation_of, max_resident_blocks
from ._ipc import (ErrorRecordOwner, ERROR_RECORD_WORDS, IpcHandles, StreamOrder, Watchdog, copy_to_device,  # noqa: F401
                   is_capturing, keep_until_exit, kernel_source_dir, mapped_error_record, write_through_peers)

logger = logging.getLogger("distrib.communicator.custom")

__all__ = ["CustomAllReduceEngine", "Limits", "SUPPORTED_WORLD_SIZES", "KERNEL_TYPES", "Algorithm",
           "ON_ERROR"]

SUPPORTED_WORLD_SIZES = (2, 4, 6, 8)
MAX_RANKS = 8
MAX_BLOCKS = 128  # DISTRIB_MAX_BLOCKS in the .cuh
THREADS = 512
PACK_BYTES = 16
SIGNAL_BYTES = 8192  # sizeof(Signal) = 4804, rounded up so staging starts aligned
CONTEXT_FORMAT = "<Q8Q8QQQii8Q"  # struct Context in the .cuh, field by field
LAMPORT_BLOCKS = 8  # DISTRIB_LAMPORT_BLOCKS in the .cuh
LAMPORT_COPIES = 3
LAMPORT_CLASSES = 2  # float32 sentinels, 16-bit sentinels
RANK_DATA_BYTES = 8 * MAX_RANKS
GRAPH_SLOTS = 16384  # registered inputs across all captures of one communicator
KERNEL_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
ON_ERROR = ("abort", "raise")

# Offsets in struct Signal (checked against the header by the layout test).
_ARRIVE_OFFSET = 0
_EPOCH_OFFSET = 4 * MAX_BLOCKS * MAX_RANKS
_P2P_CHECK_OFFSET = _EPOCH_OFFSET + 4 * MAX_BLOCKS
_LAMPORT_CALLS_OFFSET = _P2P_CHECK_OFFSET + 4 * MAX_RANKS * 4
_LAMPORT_COPY_OFFSET = _LAMPORT_CALLS_OFFSET + 4 * LAMPORT_BLOCKS
_POISON_OFFSET = _LAMPORT_COPY_OFFSET + 4 * LAMPORT_BLOCKS

# enum ErrorKind in the .cuh
_TIMEOUT, _POISONED, _UNREGISTERED = 1, 2, 3

_CALL_IDS = 1 << 32
_RECENT_CALLS = 4096  # eager calls remembered for error messages


class Algorithm:
    LAMPORT = "lamport_one_shot"
    ONE_SHOT = "one_shot"
    TWO_SHOT = "two_shot"


ALGORITHMS = (Algorithm.LAMPORT, Algorithm.ONE_SHOT, Algorithm.TWO_SHOT)
# The fused all-reduce + residual add + RMSNorm kernel of each algorithm.
NORM_KERNELS = {Algorithm.LAMPORT: "lamport_norm", Algorithm.ONE_SHOT: "one_shot_norm",
                Algorithm.TWO_SHOT: "two_shot_norm"}


@dataclass(frozen=True)
class Limits:
    """Size limits in bytes. Calls above ``max_bytes`` are not ours (NCCL takes them).

    Every rank must use the same limits (peers' buffer offsets are computed
    from them); :func:`agree_limits` checks it before any kernel runs.
    """

    max_bytes: int
    lamport_max_bytes: int
    one_shot_max_bytes: int
    max_blocks: int

    @classmethod
    def of(cls, max_bytes: int, lamport_max_bytes: int, one_shot_max_bytes: int, max_blocks: int) -> "Limits":
        return cls(max_bytes=_round_up(max_bytes, PACK_BYTES),
                   lamport_max_bytes=_round_up(min(lamport_max_bytes, max_bytes), PACK_BYTES),
                   one_shot_max_bytes=one_shot_max_bytes, max_blocks=max(1, min(max_blocks, MAX_BLOCKS)))


def kernel_digest() -> str:
    """A short hash of the kernel sources (ranks must run the same kernels)."""
    digest = hashlib.sha256()
    for path in sorted(kernel_source_dir().glob("custom_all_reduce.cu*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class CustomAllReduceEngine(ErrorRecordOwner):
    """IPC buffers, kernels, graph registration and the fail-stop watchdog of one rank.

    ``ranks_per_gpu``: the most ranks of the launch that share one GPU. Their
    kernels wait on each other, so all of their blocks must be resident at
    once, and must leave room for the ranks' other kernels: a rank's stream
    may hold a kernel (a copy, a fill) before its all-reduce, which peers
    on the same GPU are already spinning in. So on a shared GPU the spinning
    blocks of all its ranks together take at most half of its
    multiprocessors, one block each (measured on one H200: 4 and 8 ranks
    whose kernels filled the GPU's block slots waited out their timeout).
    ``on_error``: ``"abort"`` (a kernel that gave up ends this process with a
    report, as NCCL's asynchronous error handling does) or ``"raise"`` (every
    later call raises :class:`CommunicatorError`; graph replays return NaN).
    ``fail_stop=False`` compiles the poison checks out and starts no watchdog:
    only for measuring what fail-stop costs. ``test_stall=(rank, call,
    seconds)``, for tests only: that rank's one- and two-shot kernels of call
    number ``call`` stall for ``seconds`` between two of their barriers.
    """

    def __init__(self, coordinator, device: int, limits: Limits, timeout_s: float,
                 ranks_per_gpu: int = 1, on_error: str = "abort", fail_stop: bool = True,
                 test_stall: Optional[tuple[int, int, float]] = None):
        import cupy

        self._cupy = cupy
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self._names = tuple(getattr(coordinator, "ranks", range(coordinator.world_size)))  # -> global rank
        self._scope = "" if getattr(coordinator, "is_world", True) else f" of {coordinator.describe()}"
        self.device = device
        self.timeout_s = timeout_s
        self.on_error = on_error
        self._launcher = KernelLauncher(THREADS)
        self._norm_launcher = NormLauncher(THREADS)
        self._coordinator = coordinator
        self._closed = False
        self._handles = IpcHandles()  # peers' opened buffers
        self._pending: list[tuple[int, int]] = []  # (slot, input pointer) captured, not yet registered
        self._next_slot = 1  # slot 0 holds the staging buffers
        self._registering = 0
        self._call = 0
        self._recent: list = [None] * _RECENT_CALLS  # eager call id % _RECENT_CALLS -> description
        self._captured: dict[int, tuple] = {}  # captured call id -> description
        self._order = StreamOrder(device)  # one communicator's kernels never overlap

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            defines: tuple[str, ...] = () if fail_stop else ("-DDISTRIB_FAIL_STOP=0",)
            if test_stall is not None:
                rank, call, seconds = test_stall
                defines += (f"-DDISTRIB_TEST_STALL_RANK={int(rank)}", f"-DDISTRIB_TEST_STALL_CALL={int(call)}",
                            f"-DDISTRIB_TEST_STALL_NS={int(seconds * 1e9)}ull")
            self._module = _compile(self.world_size, defines)
            # CUfunction handles, for the ctypes launcher.
            self._kernels = {(alg, t): self._module.get_function(
                f"distrib::{alg}<{k}, {self.world_size}>").kernel.ptr
                for alg in ALGORITHMS for t, k in KERNEL_TYPES.items()}
            self._norm_kernels = {(alg, t): self._module.get_function(
                f"distrib::{NORM_KERNELS[alg]}<{k}, {self.world_size}>").kernel.ptr
                for alg in ALGORITHMS for t, k in KERNEL_TYPES.items()}
            self._p2p_test = self._module.get_function("distrib::p2p_write_test")
            sms = rt.getDeviceProperties(device)["multiProcessorCount"]
            resident = self._resident_blocks(sms)

            slot_bytes = max(PACK_BYTES, limits.lamport_max_bytes)
            lamport_bytes = LAMPORT_COPIES * LAMPORT_CLASSES * self.world_size * slot_bytes
            lamport_offset = SIGNAL_BYTES + 2 * limits.max_bytes
            self._base = rt.malloc(lamport_offset + lamport_bytes)
            rt.memset(self._base, 0, SIGNAL_BYTES)
            _fill_sentinels(self._base + lamport_offset, lamport_bytes)
            self._error_host, self.error = mapped_error_record()
            error_dev = self._error_host  # mapped: the same address on the device
            rt.deviceSynchronize()

            # One exchange: every rank's IPC handle and what its GPU holds.
            mine = json.dumps([bytes(rt.ipcGetMemHandle(self._base)).hex(), resident, sms]).encode()
            replies = [json.loads(r) for r in coordinator.all_gather(mine)]
            fits = min(r[1] for r in replies)
            if ranks_per_gpu > 1:
                fits = min(fits // ranks_per_gpu, min(r[2] for r in replies) // (2 * ranks_per_gpu))
                if fits * 2 < LAMPORT_BLOCKS:
                    raise CommunicatorError(
                        f"{ranks_per_gpu} ranks share one GPU with {min(r[2] for r in replies)} "
                        f"multiprocessors: too many for the custom all-reduce, whose kernels need "
                        f"{LAMPORT_BLOCKS} blocks per rank at once. Put fewer ranks on each GPU.")
            self.limits = Limits.of(limits.max_bytes, limits.lamport_max_bytes,
                                    limits.one_shot_max_bytes, min(limits.max_blocks, fits))
            bases = [self._base if peer == self.rank else self._handles.open(bytes.fromhex(r[0]))
                     for peer, r in enumerate(replies)]
            self._bases = bases
            staging = [b + SIGNAL_BYTES for b in bases]
            scratch = [b + SIGNAL_BYTES + limits.max_bytes for b in bases]
            lamport = [b + lamport_offset for b in bases]

            pad = [0] * (MAX_RANKS - self.world_size)
            context = struct.pack(CONTEXT_FORMAT, self._base, *(bases + pad), *(scratch + pad),
                                  error_dev, int(timeout_s * 1e9), self.rank,
                                  slot_bytes // PACK_BYTES, *(lamport + pad))
            self._context = rt.malloc(len(context))
            copy_to_device(self._context, context)
            # Zeroed: a slot whose inputs are not registered yet is refused by the kernel.
            self._rank_data = rt.malloc(GRAPH_SLOTS * RANK_DATA_BYTES)
            rt.memset(self._rank_data, 0, GRAPH_SLOTS * RANK_DATA_BYTES)
            self._write_slot(0, staging)
            rt.deviceSynchronize()
        self._watchdog = Watchdog(self, "custom all-reduce") if fail_stop else None

    def _resident_blocks(self, sms: int) -> int:
        """Blocks of the least-occupying kernel that the whole GPU holds at once."""
        return min(max_resident_blocks(function, THREADS, sms)
                   for function in (*self._kernels.values(), *self._norm_kernels.values()))

    # -- set-up helpers ----------------------------------------------------------
    def _write_slot(self, slot: int, pointers: list[int]) -> None:
        data = struct.pack(f"<{MAX_RANKS}Q", *(pointers + [0] * (MAX_RANKS - len(pointers))))
        copy_to_device(self._rank_data + slot * RANK_DATA_BYTES, data)

    def check_p2p(self) -> Optional[str]:
        """Write through every opened peer mapping and have the owner read it back (collective).

        Returns None if every pair works, else a reason naming the failing pairs.
        """
        cupy = self._cupy

        def write(pattern: int) -> None:
            self._p2p_test((1,), (32,), (self._context, self.world_size, cupy.uint32(pattern)))

        return write_through_peers(self._coordinator, self.device, write, self._base + _P2P_CHECK_OFFSET,
                                   self._names)

    # -- calls ---------------------------------------------------------------------
    def algorithm(self, nbytes: int) -> str:
        limits = self.limits
        if nbytes <= limits.lamport_max_bytes:
            return Algorithm.LAMPORT
        if nbytes <= limits.one_shot_max_bytes:
            return Algorithm.ONE_SHOT
        return Algorithm.TWO_SHOT

    def launch(self, dtype: str, inp: int, out: int, nbytes: int, stream: int,
               algorithm: Optional[str] = None, norm: Optional[tuple[int, int, int, int, float]] = None) -> str:
        """Enqueue one all-reduce of ``inp`` into ``out`` on ``stream``. Returns the algorithm used.

        An out-of-place call captured inside :meth:`capturing` is *registered*:
        peers will read ``inp`` itself once :meth:`register_graph_buffers` has
        run. Every other call stages ``inp`` into this rank's buffer first.
        With ``norm`` (see :meth:`launch_norm`) the fused kernel of the algorithm runs.
        """
        if self.error[0]:
            raise self.failure()
        self._order.follow(stream)
        alg = algorithm or self.algorithm(nbytes)
        packs = nbytes // PACK_BYTES
        call = self._call
        self._call = (call + 1) % _CALL_IDS
        if norm is None:
            kernel, what = self._kernels[(alg, dtype)], (alg, dtype, nbytes)
        else:
            kernel, what = self._norm_kernels[(alg, dtype)], (NORM_KERNELS[alg], dtype, nbytes)
        if alg == Algorithm.LAMPORT:
            # Pushes the input itself: needs neither staging nor registration.
            if nbytes > self.limits.lamport_max_bytes:
                raise CommunicatorError(f"{nbytes} bytes exceed the Lamport slot "
                                        f"({self.limits.lamport_max_bytes} bytes)")
            self._recent[call % _RECENT_CALLS] = what
            blocks, data, source = LAMPORT_BLOCKS, 0, inp
        else:
            if norm is None:  # packs, over blocks of THREADS threads
                wanted = -(-(packs if alg == Algorithm.ONE_SHOT else -(-packs // self.world_size)) // THREADS)
            else:  # a block per row
                rows = packs // norm[3]
                wanted = rows if alg == Algorithm.ONE_SHOT else -(-rows // self.world_size)
            blocks = max(1, min(self.limits.max_blocks, wanted))
            if self._registering and inp != out and is_capturing(stream):
                slot = self._next_slot
                if slot >= GRAPH_SLOTS:
                    raise CommunicatorError(
                        f"more than {GRAPH_SLOTS - 1} all-reduces captured on one custom communicator; "
                        "create a new communicator for further graphs")
                self._next_slot += 1
                self._pending.append((slot, inp))
                self._captured[call] = what
                data, source = self._rank_data + slot * RANK_DATA_BYTES, 0
            else:
                self._recent[call % _RECENT_CALLS] = what
                data, source = self._rank_data, inp
        if norm is None:
            self._launcher(kernel, blocks, self._context, data, source, out, packs, call, stream)
        else:
            self._norm_launcher.launch(kernel, blocks, self._context, data, source, out, packs, call, stream, norm)
        return alg

    def launch_norm(self, dtype: str, inp: int, out: int, nbytes: int, stream: int,
                    norm: tuple[int, int, int, int, float], algorithm: Optional[str] = None) -> str:
        """Enqueue one fused all-reduce + residual add + RMSNorm (``struct Norm`` in the kernel).

        ``norm`` is (residual_in, residual_out, weight, packs per row, eps);
        ``inp`` and ``out`` as in :meth:`launch`. Returns the algorithm used:
        two-shot only where both of its results fit its scratch buffer, else one-shot.
        """
        alg = algorithm or self.algorithm(nbytes)
        if alg == Algorithm.TWO_SHOT and 2 * nbytes > self.limits.max_bytes:
            alg = Algorithm.ONE_SHOT
        return self.launch(dtype, inp, out, nbytes, stream, alg, norm)

    def register_graph_buffers(self) -> int:
        """Exchange the IPC addresses of every input captured since the last call.

        Collective (one all_gather for the whole capture). Returns how many
        inputs were registered. If any rank fails, every rank raises and the
        captured slots stay empty: a replay of those graphs is refused by the
        kernel (reported like a timeout), never an illegal address.
        """
        import msgpack

        rt = self._cupy.cuda.runtime
        pending, self._pending = self._pending, []
        mine, problem = [], ""
        try:
            with self._cupy.cuda.Device(self.device):
                for slot, ptr in pending:
                    base, offset = allocation_of(ptr)
                    mine.append([slot, bytes(rt.ipcGetMemHandle(base)), offset])
        except Exception as exc:  # noqa: BLE001 — reported to every rank below
            problem = f"rank {self._names[self.rank]}: {exc}"
        everyone = [msgpack.unpackb(blob) for blob in self._coordinator.all_gather(
            msgpack.packb([problem, mine]))]
        problems = [p for p, _ in everyone if p]
        tables = [t for _, t in everyone]
        if not problems and len({len(t) for t in tables}) != 1:
            counts = ", ".join(f"rank {self._names[r]}: {len(t)}" for r, t in enumerate(tables))
            problems.append(f"ranks captured different numbers of custom all-reduces ({counts}); every "
                            "rank must capture the same sequence of all-reduces")
        if not problems and any([e[0] for e in t] != [e[0] for e in mine] for t in tables):
            problems.append("ranks disagree on the order of captured all-reduces")
        if problems:
            raise CommunicatorError(
                "registering the all-reduces captured in capture() failed, so the graphs captured "
                "there are unusable (a replay stops the communicator): " + "; ".join(problems))
        with self._cupy.cuda.Device(self.device):
            for i, (slot, ptr) in enumerate(pending):
                pointers = [ptr if peer == self.rank else self._handles.open(bytes(table[i][1])) + table[i][2]
                            for peer, table in enumerate(tables)]
                self._write_slot(slot, pointers)
            rt.deviceSynchronize()
        return len(pending)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        self._registering += 1
        try:
            yield
        finally:
            self._registering -= 1

    # -- failures -------------------------------------------------------------------
    def describe_failure(self) -> str:
        who, block, call, kind = self.error[0] - 1, self.error[1], self.error[2], self.error[3]
        what = self._call_text(call)
        name = self._name
        if kind == _TIMEOUT:
            cause = (f"gave up after {self.timeout_s:g}s waiting for rank {name(who)} (block {block}) in "
                     f"{what}: rank {name(who)} is hung, dead, or called a different sequence of all-reduces")
        elif kind == _POISONED:
            stopper, waited = (who & 0xFFFF) - 1, (who >> 16) - 1
            reason = ("refused a graph replay before its captured all-reduces were registered"
                      if waited == stopper else f"had given up waiting for rank {name(waited)}")
            cause = f"was stopped before {what}: rank {name(stopper)} {reason}"
        elif kind == _UNREGISTERED:
            cause = (f"refused {what}: a CUDA graph was replayed before its captured all-reduces "
                     "were registered (replay only after the `with comm.capture():` block has "
                     "ended), or their registration failed")
        else:
            cause = f"failed (error kind {kind}, rank {name(who)}, block {block}) in {what}"
        return (f"custom all-reduce on rank {name(self.rank)}{self._scope} {cause}. The communicator is "
                f"stopped on every rank{self._scope}: later all-reduces raise, and graph replays write NaN.")

    def _name(self, rank: int) -> str:
        """The global rank of ``rank`` (a rank of this communicator), as text."""
        return str(self._names[rank]) if 0 <= rank < len(self._names) else f"#{rank}"

    def _call_text(self, call: int) -> str:
        if call in self._captured:
            alg, dtype, nbytes = self._captured[call]
            return f"a graph replay of captured all-reduce #{call} ({alg}, {dtype}, {nbytes} bytes)"
        recent = self._recent[call % _RECENT_CALLS]
        if recent is not None:
            alg, dtype, nbytes = recent
            return f"all-reduce #{call} ({alg}, {dtype}, {nbytes} bytes)"
        return f"all-reduce #{call}"

    # -- tests ----------------------------------------------------------------------------
    def set_counters_for_test(self, epoch: int, lamport_calls: int) -> None:
        """Set this rank's barrier counters and Lamport call counters (collective, quiescent).

        Every rank must call it with the same values, with no all-reduce in
        flight; it puts the counters near their wrap-around in tests.
        """
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.device):
            rt.deviceSynchronize()
        self._coordinator.barrier()
        arrive = struct.pack(f"<{MAX_BLOCKS * MAX_RANKS}I", *([epoch % _CALL_IDS] * (MAX_BLOCKS * MAX_RANKS)))
        epochs = struct.pack(f"<{MAX_BLOCKS}I", *([epoch % _CALL_IDS] * MAX_BLOCKS))
        calls = struct.pack(f"<{LAMPORT_BLOCKS}I", *([lamport_calls % _CALL_IDS] * LAMPORT_BLOCKS))
        with self._cupy.cuda.Device(self.device):
            copy_to_device(self._base + _ARRIVE_OFFSET, arrive)
            copy_to_device(self._base + _EPOCH_OFFSET, epochs)
            copy_to_device(self._base + _LAMPORT_CALLS_OFFSET, calls)
            rt.deviceSynchronize()
        self._coordinator.barrier()

    def read_counters_for_test(self) -> tuple[list[int], list[int]]:
        """(epoch per block, Lamport calls per block) of this rank."""
        rt = self._cupy.cuda.runtime
        words = (ctypes.c_uint32 * (MAX_BLOCKS + 2 * LAMPORT_BLOCKS))()
        with self._cupy.cuda.Device(self.device):
            rt.deviceSynchronize()
            rt.memcpy(ctypes.addressof(words), self._base + _EPOCH_OFFSET, 4 * MAX_BLOCKS,
                      rt.memcpyDeviceToHost)
            rt.memcpy(ctypes.addressof(words) + 4 * MAX_BLOCKS, self._base + _LAMPORT_CALLS_OFFSET,
                      8 * LAMPORT_BLOCKS, rt.memcpyDeviceToHost)
        return list(words[:MAX_BLOCKS]), list(words[MAX_BLOCKS:MAX_BLOCKS + LAMPORT_BLOCKS])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.stop()
        rt = self._cupy.cuda.runtime
        try:
            with self._cupy.cuda.Device(self.device):
                rt.deviceSynchronize()
                self._handles.close()
                for ptr in (self._rank_data, self._context):
                    rt.free(ptr)
                self._order.close()
                # Our exported buffer and the error record: one of each per closed communicator.
                keep_until_exit(self._base, self._error_host)
        except Exception as exc:  # closing must not raise from a broken context
            logger.warning("custom all-reduce: error while freeing buffers: %s", exc)


def _compile(world_size: int, defines: tuple[str, ...] = ()):
    """NVRTC-compile the kernels for this world size (CuPy caches the result on disk)."""
    import cupy

    source_dir = kernel_source_dir()
    code = (source_dir / "custom_all_reduce.cu").read_text()
    names = [f"distrib::{kernel}<{k}, {world_size}>" for alg in ALGORITHMS
             for kernel in (alg, NORM_KERNELS[alg]) for k in KERNEL_TYPES.values()] + ["distrib::p2p_write_test"]
    options = ("--std=c++17", f"-I{source_dir}") + defines
    try:
        module = cupy.RawModule(code=code, options=options, name_expressions=names)
        module.compile()
    except Exception as exc:
        raise CommunicatorError(f"compiling the custom all-reduce kernels failed: {exc}") from exc
    return module


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


def agree_limits(coordinator, limits: Limits, algorithm: Optional[str]) -> None:
    """Raise :class:`CommunicatorError` on every rank unless every rank has the same limits.

    Peers' buffer offsets are computed from the limits, and the block count
    and algorithm decide which barriers meet: ranks that differ would read
    and write past each other's allocations or pair barriers wrongly.
    """
    from .._text import rank_list

    mine = dict(asdict(limits), algorithm=algorithm, kernels=kernel_digest())
    everyone = [json.loads(r) for r in coordinator.all_gather(json.dumps(mine, sort_keys=True).encode())]
    differ = []
    for key in mine:
        groups: dict = {}
        for rank, theirs in enumerate(everyone):
            groups.setdefault(json.dumps(theirs.get(key)), []).append(coordinator.ranks[rank])
        if len(groups) > 1:
            differ.append(f"{key}: " + ", ".join(f"{rank_list(r)} = {v}" for v, r in groups.items()))
    if differ:
        raise CommunicatorError(
            "ranks disagree on the custom all-reduce's settings (" + "; ".join(differ) + "); set "
            "DISTRIB_CUSTOM_MAX_BYTES, the communicator's options and the distrib version alike on "
            "every rank")
