"""A tiny process that stops a launcher's worker groups if the launcher dies first.

The kernel kills each worker when its launcher dies (PR_SET_PDEATHSIG), but
not the worker's own children: they would be orphaned. The guardian closes
that gap. The launcher starts it first, tells it each worker's process group
over a pipe, and says ``done`` when it has stopped the workers itself. If the
pipe ends without ``done`` (the launcher was SIGKILLed), the guardian SIGKILLs
every group it was told about, then exits.

Protocol on the guardian's stdin, one line each: ``<pgid>`` to watch a
group, ``done`` to exit without killing anything.
"""
from __future__ import annotations

import subprocess
import sys

__all__ = ["Guardian"]


class Guardian:
    """The launcher's handle on its guardian process."""

    def __init__(self, process: subprocess.Popen):
        self._process = process

    @classmethod
    def start(cls) -> "Guardian":
        process = subprocess.Popen(
            # -S -c: a bare interpreter starts in milliseconds, beside the workers.
            [sys.executable, "-S", "-c", _GUARDIAN_SOURCE],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
            # Its own session: a Ctrl-C or a group kill aimed at the launcher
            # must not take the guardian down with it.
            start_new_session=True)
        return cls(process)

    def watch(self, pgid: int) -> None:
        self._send(f"{pgid}\n")

    def release(self) -> None:
        """The launcher has stopped its workers itself: let the guardian exit quietly."""
        self._send("done\n")
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _send(self, line: str) -> None:
        try:
            self._process.stdin.write(line.encode())
            self._process.stdin.flush()
        except (OSError, ValueError):
            pass  # the guardian is gone; PR_SET_PDEATHSIG still covers the workers


# The guardian's whole program (run with ``python -S -c``, so that it needs
# no imports beyond the standard library's os, signal and sys).
_GUARDIAN_SOURCE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = []
for raw in sys.stdin.buffer:
    line = raw.strip()
    if line == b"done":
        sys.exit(0)
    if line.isdigit():
        groups.append(int(line))
for pgid in groups:  # the pipe ended without "done": the launcher died
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
"""
