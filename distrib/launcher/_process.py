"""Process-tree plumbing shared by launchers (not a launcher itself)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional, Protocol, Sequence

__all__ = ["die_with_parent", "stop_processes", "Stoppable", "signal_name", "record_stop_signals",
           "restore_signals", "freeze_for_exit"]

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
    """True while ``pid`` runs; a zombie (a launcher that died but is not reaped yet) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def freeze_for_exit() -> None:
    """Make this process's coming interpreter exit short (a failed rank's, the launcher's).

    A launcher acts on a failed rank once its process has ended, and is itself
    done only when it has exited: both exits are part of the time the fault
    takes to stop a launch. With torch loaded, most of such an exit (0.3 s of
    0.4 s on an idle core, several times that under load) is the cycle
    collector walking every object of a thousand modules. Frozen objects are
    skipped; atexit handlers still run, and files and streams are still
    flushed and closed as their last reference goes. Only garbage in reference
    cycles goes unfinalized, which Python does not promise at exit anyway.
    """
    import gc

    gc.freeze()


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
    ``killpg(pgid, 0)`` alone cannot tell a finished worker from a live one;
    it does tell an empty group, cheaply, so only groups with members cost a
    look at the process table.)
    """
    candidates = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
            candidates.add(pgid)
        except ProcessLookupError:
            continue
        except PermissionError:
            candidates.add(pgid)
    if not candidates:
        return set()
    import psutil

    live = set()
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) in candidates:
                live.add(os.getpgid(proc.pid))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return live


class Stoppable(Protocol):
    """A worker as :func:`stop_processes` sees it: our child, and the leader of its group."""

    @property
    def pid(self) -> Optional[int]:
        """Its process id (None before it has started)."""

    def poll(self) -> Optional[int]:
        """The exit status once the process has ended (reaping it), else ``None``."""


def stop_processes(processes: Sequence[Stoppable], first_signal: int = signal.SIGTERM,
                   grace: float = 1.0, cut_short: Callable[[], bool] = lambda: False,
                   unkillable_wait: float = 5.0) -> None:
    """Stop every process in ``processes`` and its process group, whatever stage each is in.

    A worker that is still being started (spawned, importing) has not yet made
    itself the leader of its own group, so a signal to the group alone would
    miss it: each process gets ``first_signal`` itself (while it is our
    unreaped child, so its pid cannot belong to anyone else) and through its
    group, and a group that appears later (the worker called ``setpgrp`` after
    the first signal) gets it too. A SIGINT (Ctrl-C, passed on) that has not
    ended a process within a second is followed by SIGTERM: Python acts on
    SIGINT only between bytecodes, so a rank blocked in a C call would not see
    it. What is still alive after ``grace`` seconds
    (or when ``cut_short()`` says so) gets SIGKILL, again and again, until
    every process is reaped and every group is empty. A process that SIGKILL
    cannot end within ``unkillable_wait`` seconds (uninterruptible sleep) is
    left; nothing else is.
    """
    processes = [p for p in processes if p.pid]
    groups = {p.pid for p in processes}
    signalled_pids: set[int] = set()
    signalled_groups: set[int] = set()
    signum = first_signal
    kill_deadline = time.monotonic() + grace
    interrupt_deadline = time.monotonic() + min(_INTERRUPT_WAIT, grace)
    give_up = None
    while True:
        live = [p for p in processes if p.poll() is None]
        live_groups = _live_groups({g for g in groups if g is not None})
        if not live and not live_groups:
            return
        now = time.monotonic()
        if signum == signal.SIGINT and now >= interrupt_deadline:
            # Python sees SIGINT only between bytecodes: a rank blocked in a C call (a
            # collective, an import) goes on. SIGTERM ends it, unless it handles that too.
            signum = signal.SIGTERM
            signalled_pids.clear()
            signalled_groups.clear()
        if signum != signal.SIGKILL and (now >= kill_deadline or cut_short()):
            signum = signal.SIGKILL
            give_up = now + unkillable_wait
        if give_up is not None and now >= give_up:
            return
        resend = signum == signal.SIGKILL  # SIGKILL cannot be caught twice; repeat it freely
        for p in live:
            pid = p.pid
            if pid is None or (pid in signalled_pids and not resend):
                continue
            if _leads_group(pid):
                _killpg(pid, signum)  # once, through the group: the leader gets it once
                signalled_groups.add(pid)
            else:
                _kill(pid, signum)    # still starting: not in its own group yet
            signalled_pids.add(pid)
        for pgid in live_groups:
            if pgid not in signalled_groups or resend:
                _killpg(pgid, signum)
                signalled_groups.add(pgid)
        time.sleep(_STOP_POLL)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


_STOP_POLL = 0.02  # seconds between looks while stopping
_INTERRUPT_WAIT = 1.0  # seconds a SIGINT has to stop a process before SIGTERM follows


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
