"""A tiny process that cleans up after a launcher that dies first.

The kernel kills each worker when its launcher dies (PR_SET_PDEATHSIG), but
not the worker's own children: they would be orphaned. Nor can a SIGKILLed
launcher remove its scratch folder (stack files, MPS pipes). The guardian
closes both gaps. The launcher starts it first, tells it each worker's
process group and its scratch folder over a pipe, and says ``done`` when it
has stopped the workers and removed the folder itself. If the pipe ends
without ``done`` (the launcher was SIGKILLed), the guardian SIGKILLs every
group it was told about, removes the folders, then exits.

Protocol on the guardian's stdin, one line each: ``<pgid>`` to watch a
group, ``scratch <path>`` to remove a folder, ``done`` to exit without
touching anything.
"""
from __future__ import annotations

import os
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

    def remove_later(self, folder: str) -> None:
        """Have the guardian remove ``folder`` if the launcher dies without doing so."""
        if "\n" not in folder:
            self._send(f"scratch {folder}\n")

    def release(self) -> None:
        """The launcher has stopped its workers itself: let the guardian exit quietly."""
        self._send("done\n")
        try:
            if self._process.stdin is not None:
                self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _send(self, line: str) -> None:
        pipe = self._process.stdin  # a pipe: the guardian is started with stdin=PIPE
        try:
            if pipe is not None:
                pipe.write(os.fsencode(line))
                pipe.flush()
        except (OSError, ValueError):
            pass  # the guardian is gone; PR_SET_PDEATHSIG still covers the workers


# The guardian's whole program (run with ``python -S -c``, so that it needs
# no imports beyond a few of the standard library's).
_GUARDIAN_SOURCE = """
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups, folders = [], []
for raw in sys.stdin.buffer:
    line = raw.rstrip(b"\\n")
    if line == b"done":
        sys.exit(0)
    if line.isdigit():
        groups.append(int(line))
    elif line.startswith(b"scratch "):
        folders.append(os.fsdecode(line[len(b"scratch "):]))
for pgid in groups:  # the pipe ended without "done": the launcher died
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
for folder in folders:  # after the workers, which write there (briefly: a killed one may be exiting)
    for _ in range(10):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            break
        time.sleep(0.05)
"""
