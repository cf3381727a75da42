"""Process-tree plumbing shared by launchers (not a launcher itself)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterable

__all__ = ["die_with_parent", "terminate_trees", "signal_name", "record_stop_signals",
           "restore_signals"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(launcher_pid: int) -> None:
    """Make this process die with the launcher, even if the launcher is SIGKILLed.

    When the launcher is our parent (spawn, fork), the kernel delivers
    SIGKILL on its exit (PR_SET_PDEATHSIG). Under forkserver the parent is
    the fork server, which itself exits when the launcher does. A watchdog
    thread that checks the launcher's pid covers every case, including a
    launcher that died before this process made its request.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
    if not _alive(launcher_pid):
        os._exit(1)

    def watch() -> None:
        while _alive(launcher_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="distrib-launcher-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_stop_signals(received: list) -> dict:
    """Append SIGINT/SIGTERM to ``received`` instead of dying; returns the previous handlers.

    Only the main thread may install handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        received.append(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict) -> None:
    """Put back the handlers :func:`record_stop_signals` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _live_groups(pgids: set[int]) -> set[int]:
    """The groups in ``pgids`` that still have a process that is not a zombie.

    (A zombie still belongs to its group until its parent reaps it, so
    ``killpg(pgid, 0)`` alone cannot tell a finished worker from a live one.)
    """
    import psutil

    live = set()
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) in pgids:
                live.add(os.getpgid(proc.pid))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return live


def terminate_trees(pgids: Iterable[int], grace: float = 1.0) -> None:
    """SIGTERM every process group in ``pgids``, then SIGKILL what is left after ``grace``.

    Each worker leads its own process group, so its children (a data loader,
    a compiler, a shell) go with it.
    """
    pgids = [p for p in pgids if p and p > 0]
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    remaining = _live_groups(set(pgids))
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = _live_groups(remaining)
    for pgid in remaining:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
