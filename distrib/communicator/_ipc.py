"""CUDA IPC pieces shared by the custom all-reduce and the IPC send/recv.

Both communicators share buffers between the processes of one node through
CUDA IPC, check that every peer mapping really carries writes, record a
kernel's failure in host-mapped memory and stop the process from a watchdog
thread. Each piece here works on raw pointers and a Coordinator; CuPy is
imported only when one is used.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import CommunicatorError

logger = logging.getLogger("distrib.communicator.custom")

__all__ = ["ErrorRecordOwner", "kernel_source_dir", "unavailable_reason", "peer_access_problem", "write_through_peers", "check_p2p", "p2p_cache_path", "copy_to_device",
           "mapped_error_record", "is_capturing", "IpcHandles", "StreamOrder", "Watchdog",
           "keep_until_exit"]

ERROR_RECORD_WORDS = 8  # struct ErrorRecord in custom_all_reduce.cuh, u32 words
WATCHDOG_INTERVAL = 0.05  # seconds between a watchdog's looks at its error record
_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped
_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def kernel_source_dir() -> Path:
    """The folder that holds the CUDA sources (the repo's kernels/, or installed data)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "kernels", here.parents[1] / "kernels"):
        if (candidate / "custom_all_reduce.cuh").exists():
            return candidate
    raise CommunicatorError(
        "kernels/custom_all_reduce.cuh was not found next to the distrib package; reinstall "
        "distrib from a full source tree")


def unavailable_reason(coordinator, device: Optional[int]) -> Optional[str]:
    """Why CUDA IPC cannot join ``coordinator``'s ranks on ``device``, or None (cheap, local):
    they span nodes, CuPy is missing, or there is no such device."""
    if coordinator.nnodes > 1:
        return (f"{coordinator.describe()} spans {coordinator.nnodes} nodes; CUDA IPC works only "
                "within one node")
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc})"
    if device is None:
        return "no CUDA device was given"
    try:
        if not 0 <= device < cupy.cuda.runtime.getDeviceCount():
            return f"device {device} does not exist"
    except Exception as exc:  # noqa: BLE001 - no driver
        return f"CUDA is not usable here: {exc}"
    return None


def peer_access_problem(rank: int, device: int, bus_ids: list[str], ranks) -> Optional[str]:
    """Why this rank cannot reach every peer's GPU, or None. Ranks on the same GPU reach each other.

    ``ranks`` maps a rank of the communicator to its global rank, for the message.
    """
    import cupy

    rt = cupy.cuda.runtime
    for peer, bus_id in enumerate(bus_ids):
        if peer == rank or bus_id == bus_ids[rank]:
            continue
        if not rt.deviceCanAccessPeer(device, rt.deviceGetByPCIBusId(bus_id)):
            return (f"the driver reports no peer access from {bus_ids[rank]} to rank {ranks[peer]}'s "
                    f"{bus_id} (PCIe without P2P?)")
    return None


def agree_on_peer_access(coordinator, device: int) -> list[str]:
    """Every member's GPU (PCI bus id); raises on every member unless each reaches every other."""
    import cupy

    bus_ids = [b.decode() for b in coordinator.all_gather(
        cupy.cuda.runtime.deviceGetPCIBusId(device).encode())]
    # Check locally, then agree: a rank that raised here alone would leave
    # the others waiting in the next collective step.
    reason = peer_access_problem(coordinator.rank, device, bus_ids, coordinator.ranks)
    problems = [r.decode() for r in coordinator.all_gather((reason or "").encode())]
    if any(problems):
        raise CommunicatorError("; ".join(f"rank {coordinator.ranks[r]}: {p}"
                                          for r, p in enumerate(problems) if p))
    return bus_ids


def check_p2p(coordinator, bus_ids: list[str], write_test: Callable[[], Optional[str]]) -> None:
    """A real write through every IPC mapping (``write_test``, collective), cached per set of GPUs.

    The driver's peer-access answer has lied (TRT-LLM PR #17034), so a
    communicator writes through every mapping once and each owner reads it
    back; a set of GPUs that passed is remembered on disk. Raises on every
    member if some pair fails.
    """
    path = p2p_cache_path(bus_ids)
    cached = None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    # Every rank must agree on whether to run the (collective) test.
    known = coordinator.all_gather(b"1" if cached and cached.get("ok") else b"0")
    if all(k == b"1" for k in known):
        return
    reason = write_test()
    if coordinator.is_local_master():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"ok": reason is None, "reason": reason, "devices": bus_ids}))
        except OSError:
            pass
    if reason is not None:
        raise CommunicatorError(reason)


def write_through_peers(coordinator, device: int, write: Callable[[int], None], mine: int,
                        names) -> Optional[str]:
    """The write test (collective): ``write(pattern)`` launches a kernel that writes ``pattern ^ owner``
    into word 4 * (writer) of ``owner``'s check area, through the IPC mapping; each owner reads its
    area (``world_size * 4`` words at device address ``mine``) back. None if every pair arrived,
    else the failing pairs, by global rank (``names``)."""
    import cupy

    rt = cupy.cuda.runtime
    world, rank = coordinator.world_size, coordinator.rank
    pattern = 0x5EED0000 + world
    with cupy.cuda.Device(device):
        write(pattern)
        rt.deviceSynchronize()
    coordinator.barrier()
    with cupy.cuda.Device(device):
        words = (ctypes.c_uint32 * (world * 4))()
        rt.memcpy(ctypes.addressof(words), mine, ctypes.sizeof(words), rt.memcpyDeviceToHost)
    bad = [writer for writer in range(world) if words[writer * 4] != (pattern ^ rank)]
    verdicts = coordinator.all_gather(json.dumps(bad).encode())
    failures = [(writer, owner) for owner, v in enumerate(verdicts) for writer in json.loads(v)]
    if failures:
        pairs = ", ".join(f"{names[w]}->{names[o]}" for w, o in failures)
        return f"P2P writes through CUDA IPC did not arrive for rank pairs {pairs}"
    return None


def p2p_cache_path(bus_ids: list[str]) -> Path:
    key = hashlib.sha256(json.dumps(sorted(bus_ids)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("DISTRIB_CACHE_DIR", Path.home() / ".cache" / "distrib"))
    return root / f"p2p-{key}.json"


def copy_to_device(dst: int, data: bytes) -> None:
    """Synchronous host-to-device copy of ``data`` (pageable source: safe to drop after)."""
    import cupy

    buf = ctypes.create_string_buffer(data, len(data))
    rt = cupy.cuda.runtime
    rt.memcpy(dst, ctypes.addressof(buf), len(data), rt.memcpyHostToDevice)


def mapped_error_record():
    """A zeroed ErrorRecord in host-mapped pinned memory: ``(address, u32 words)``.

    With unified addressing the host address is also the device address, so
    kernels write it and the host reads it without any copy.
    """
    import cupy

    address = cupy.cuda.runtime.hostAlloc(4 * ERROR_RECORD_WORDS, _HOST_ALLOC_MAPPED)
    ctypes.memset(address, 0, 4 * ERROR_RECORD_WORDS)
    return address, (ctypes.c_uint32 * ERROR_RECORD_WORDS).from_address(address)


def is_capturing(stream: int) -> bool:
    import cupy

    return cupy.cuda.runtime.streamIsCapturing(stream) != 0


class IpcHandles:
    """Peers' IPC handles, each opened once; :meth:`close` closes them all."""

    def __init__(self) -> None:
        self._opened: dict[bytes, int] = {}

    def open(self, handle: bytes) -> int:
        if handle not in self._opened:
            import cupy

            self._opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle, _IPC_LAZY_PEER_ACCESS)
        return self._opened[handle]

    def close(self) -> None:
        import cupy

        for ptr in self._opened.values():
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        self._opened.clear()


class StreamOrder:
    """Orders launches that share device state across the caller's streams.

    Kernels that share counters and buffers (one communicator's, or one
    send/recv channel's) must never overlap. On one stream, stream order sees
    to it; when the caller switches streams, the new stream waits for an
    event recorded on the old one now (which covers its last kernel). Inside
    a graph capture the capture's own ordering applies and nothing is recorded.
    """

    def __init__(self, device: int):
        self._device = device
        self._last: Optional[int] = None
        self._event = None

    def follow(self, stream: int) -> None:
        if stream == self._last:
            return
        import cupy

        rt = cupy.cuda.runtime
        if is_capturing(stream):
            self._last = None
            return
        if self._last is not None:
            if self._event is None:
                with cupy.cuda.Device(self._device):
                    self._event = rt.eventCreateWithFlags(rt.eventDisableTiming)
            rt.eventRecord(self._event, self._last)
            rt.streamWaitEvent(stream, self._event, 0)
        self._last = stream

    def close(self) -> None:
        if self._event is not None:
            import cupy

            cupy.cuda.runtime.eventDestroy(self._event)
            self._event = None


_kept_until_exit: list[int] = []  # buffers of closed engines that peers or graphs may still use


def keep_until_exit(*pointers: int) -> None:
    """Never free these: peers may still have them open (closing is not collective), and
    freeing exported memory before every importer closed its handle is undefined behaviour
    (cudaIpcOpenMemHandle's contract); graphs replayed later may still write an error record.
    The driver reclaims them with the context when the process ends."""
    _kept_until_exit.extend(pointers)


class ErrorRecordOwner:
    """What the IPC engines share about their host-mapped error record (see :class:`Watchdog`).

    A subclass sets ``error`` (the record's words, from :func:`mapped_error_record`)
    and writes ``describe_failure()``.
    """

    error: Any

    def describe_failure(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if a kernel of this communicator gave up (on this rank or, poisoned, on a peer)."""
        if self.error[0]:
            raise self.failure()

    def failure(self) -> CommunicatorError:
        """The error that the error record describes (call only once it is set)."""
        return CommunicatorError(self.describe_failure())


class Watchdog:
    """Reads an engine's host-mapped error record every ``WATCHDOG_INTERVAL`` seconds.

    Graph replays never return to Python, so nothing else would notice a
    kernel that gave up. On ``on_error="abort"`` it ends the process through
    :func:`distrib._fatal.stop_process` (the launcher's hang report shows
    every rank's stack, and the launcher names this rank's message as the
    cause); on ``"raise"`` it logs the failure once and later calls raise.
    The engine has ``error`` (the record's words), ``describe_failure()``,
    ``on_error`` and ``rank``.
    """

    def __init__(self, engine, what: str):
        self._engine = engine
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"distrib-{what.replace(' ', '-')}-watchdog",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        error = self._engine.error
        while not self._stop.wait(WATCHDOG_INTERVAL):
            if error[0]:
                self._fire()
                return

    def _fire(self) -> None:
        engine = self._engine
        message = engine.describe_failure()
        if engine.on_error == "raise":
            logger.error("%s", message)
            return
        from .. import _fatal

        _fatal.stop_process("distrib.errors.CommunicatorError",
                            f"{message} Stopping this process (create the communicator with "
                            "on_error='raise' to handle this yourself).",
                            report=self._what)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
