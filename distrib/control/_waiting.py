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
20 us to :data:`MAX_SLEEP` (1 ms). A reader that has waited less than the spin
phase (a worker between two steps) sees a message within microseconds; one
idle for longer costs ~1k short wake-ups a second and sees a message within
about a millisecond. ``sched_yield`` hands the core to any runnable process,
so spinners do not starve the writer when there are more processes than
cores.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

from ..errors import ConfigError

__all__ = ["full_fence", "Backoff", "ProcessWatch", "SPIN_SECONDS", "MAX_SLEEP", "WATCH_INTERVAL",
           "SPIN_VAR"]

SPIN_VAR = "DISTRIB_CHANNEL_SPIN_MS"
FIRST_SLEEP = 20e-6
MAX_SLEEP = 1e-3
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
    """Spin with ``sched_yield`` until ``SPIN_SECONDS`` have passed, then sleep, growing to ``MAX_SLEEP``."""

    __slots__ = ("spin_until", "sleep")

    def __init__(self, now: float):
        self.spin_until = now + SPIN_SECONDS
        self.sleep = FIRST_SLEEP

    def pause(self, now: float) -> None:
        if now < self.spin_until:
            os.sched_yield()
        else:
            time.sleep(self.sleep)
            self.sleep = min(self.sleep * 2, MAX_SLEEP)


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
