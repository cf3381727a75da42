"""How the broadcast channel waits: a memory fence, spin-then-sleep back-off, peer watching.

The fence. Python has no atomic operations or fences of its own;
:func:`full_fence` is ``acquire; release; acquire; release`` of a lock.
CPython's lock is a POSIX semaphore (3.11 and 3.12 on Linux) or, in newer
versions, a compare-and-swap on a byte: the release is a release RMW (or a
store-release), the acquire an acquire RMW. A release followed in program
order by an acquire is ordered (Arm: [L]; po; [A]), so every memory access
before the first release is ordered before every access after the second
acquire: a full barrier. On x86-64 each is a lock-prefixed instruction, a
full barrier by itself. Uncontended it costs ~0.2 us and never blocks; it is
safe from several threads (each thread's own release/acquire pair orders its
own accesses).

The back-off. A waiter spins on its counter with ``sched_yield`` for
:data:`SPIN_SECONDS` (10 ms; the environment variable
``DISTRIB_CHANNEL_SPIN_MS`` changes it), then sleeps in intervals growing from
20 us to a cap. A reader that has waited less than the spin phase (a worker
between two steps) sees a message within microseconds. On Linux a sleeping
reader waits on a futex of the word the writer publishes next, and the writer
wakes it (:class:`Futex`), so an idle reader is woken at once and its sleeps
can grow to :data:`MAX_WOKEN_SLEEP`; elsewhere sleeps stop at
:data:`MAX_SLEEP` (1 ms), and an idle reader sees a message within about a
millisecond. ``sched_yield`` hands the core to any runnable process,
so spinners do not starve the writer when there are more processes than
cores.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
import time
from typing import Callable, Optional

from ..errors import ConfigError

__all__ = ["full_fence", "Backoff", "Futex", "FUTEX", "ProcessWatch", "buffer_address", "SPIN_SECONDS",
           "MAX_SLEEP", "MAX_WOKEN_SLEEP", "WATCH_INTERVAL", "SPIN_VAR"]

SPIN_VAR = "DISTRIB_CHANNEL_SPIN_MS"
FIRST_SLEEP = 20e-6
MAX_SLEEP = 1e-3
MAX_WOKEN_SLEEP = 50e-3  # a futex waiter is woken by the writer; the cap only bounds other checks
WATCH_INTERVAL = 0.1  # seconds between checks that a peer process is alive


def _spin_seconds() -> float:
    text = os.environ.get(SPIN_VAR, "10")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{SPIN_VAR}={text!r} is invalid; expected milliseconds >= 0 (default 10)")
    return value / 1e3


SPIN_SECONDS = _spin_seconds()

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between the caller's earlier and later memory accesses (see above)."""
    _fence_lock.acquire()
    _fence_lock.release()
    _fence_lock.acquire()
    _fence_lock.release()


class Backoff:
    """Spin with ``sched_yield`` until ``SPIN_SECONDS`` have passed, then sleep, growing to a cap.

    ``pause(now, sleep)`` sleeps through ``sleep(seconds)`` when given (a
    futex wait, which a writer ends early), else ``time.sleep``; a waiter that
    can be woken sleeps up to :data:`MAX_WOKEN_SLEEP`, one that cannot up to
    :data:`MAX_SLEEP`.
    """

    __slots__ = ("spin_until", "sleep")

    def __init__(self, now: float):
        self.spin_until = now + SPIN_SECONDS
        self.sleep = FIRST_SLEEP

    def pause(self, now: float, sleep: Optional[Callable[[float], None]] = None) -> None:
        if now < self.spin_until:
            os.sched_yield()
        elif sleep is None:
            time.sleep(self.sleep)
            self.sleep = min(self.sleep * 2, MAX_SLEEP)
        else:
            sleep(self.sleep)
            self.sleep = min(self.sleep * 2, MAX_WOKEN_SLEEP)


class Futex:
    """Linux futexes on 32-bit words of a shared mapping: a sleeping reader is woken at once.

    ``wait(address, expected, seconds)`` sleeps while the word at ``address``
    holds ``expected`` (at most ``seconds``; a change, a wake, a signal or a
    spurious wake-up ends it early: callers look again). ``wake(address)``
    wakes every waiter on the word. Not the private variant: the word lives in
    memory shared between processes.
    """

    _SYSCALL = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "ppc64le": 221}
    _WAIT, _WAKE = 0, 1

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def __init__(self):
        number = self._SYSCALL.get(platform.machine().lower())
        if not sys.platform.startswith("linux") or number is None or sys.byteorder != "little":
            # (the ring waits on the low 32 bits of a 64-bit word: its first 4 bytes, little-endian)
            raise OSError("futexes need Linux on a known little-endian architecture")
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL releases the GIL during the call
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._number = ctypes.c_long(number)

    def wait(self, address: int, expected: int, seconds: float) -> None:
        seconds = max(0.0, seconds)
        timeout = self._Timespec(int(seconds), int((seconds % 1.0) * 1e9))
        result = self._syscall(self._number, ctypes.c_void_p(address), ctypes.c_long(self._WAIT),
                               ctypes.c_long(expected & 0xFFFFFFFF), ctypes.byref(timeout), None,
                               ctypes.c_long(0))
        if result != 0:
            code = ctypes.get_errno()
            if code not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(code, f"futex wait failed: {os.strerror(code)}")

    def wake(self, address: int) -> None:
        self._syscall(self._number, ctypes.c_void_p(address), ctypes.c_long(self._WAKE),
                      ctypes.c_long(0x7FFFFFFF), None, None, ctypes.c_long(0))


def _futex() -> Optional[Futex]:
    try:
        return Futex()
    except (OSError, AttributeError):
        return None


FUTEX: Optional[Futex] = _futex()  # None where unavailable: waiters then sleep in plain intervals


def buffer_address(buffer) -> int:
    """The address of a writable buffer's first byte (an mmap); valid while it stays mapped."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the export, so the mapping can still be closed


class ProcessWatch:
    """Whether a process on this node is still alive (pid reuse is caught by its start time).

    A pid that is not visible at construction (another pid namespace) is not
    watched: :meth:`dead` then always says False and only the timeout applies.
    """

    def __init__(self, pid: int):
        import psutil

        self.pid = pid
        try:
            self._started: Optional[float] = psutil.Process(pid).create_time()
        except (psutil.Error, OSError):
            self._started = None

    def dead(self) -> bool:
        import psutil

        if self._started is None:
            return False
        try:
            process = psutil.Process(self.pid)
            return process.create_time() != self._started or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
        except (psutil.Error, OSError):
            return False
