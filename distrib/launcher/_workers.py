"""Worker processes of a command launcher: start one, tell how it failed, stop a set of them.

Each worker is a fresh interpreter that leads its own process group (and
session), so a signal to the group reaches the worker's children too, and a
terminal's Ctrl-C reaches only the launcher, which decides what to pass on.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Callable, Mapping, Optional, Sequence

from ..errors import LaunchError, WorkerFailure
from ._errorfile import read_error_file, read_torch_error_file, torch_error_file
from ._process import signal_name, stop_processes

__all__ = ["WorkerProcess", "stop_workers"]

class WorkerProcess:
    """One worker: its rank, its process, and the error record it may leave."""

    def __init__(self, rank: int, local_rank: int, process: subprocess.Popen, error_file: str):
        self.rank = rank
        self.local_rank = local_rank
        self.process = process
        self.error_file = error_file
        self.exit_time: Optional[float] = None  # wall clock, when we first saw it exit

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], rank: int, local_rank: int,
              error_file: str) -> tuple["WorkerProcess", int, int]:
        """Start ``argv``; returns the worker and the read ends of its stdout and stderr pipes."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            process = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                       stdout=out_w, stderr=err_w, close_fds=True,
                                       start_new_session=True)
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            raise LaunchError(f"could not start rank {rank} ({' '.join(argv)}): {exc}") from exc
        finally:
            os.close(out_w)  # the worker holds its own copies
            os.close(err_w)
        return cls(rank, local_rank, process, error_file), out_r, err_r

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> Optional[int]:
        """The exit status (negative: killed by that signal), or ``None`` while it runs."""
        code = self.process.poll()
        if code is not None and self.exit_time is None:
            self.exit_time = time.time()
        return code

    def has_record(self) -> bool:
        return os.path.exists(self.error_file) or os.path.exists(torch_error_file(self.error_file))

    def failure(self) -> Optional[WorkerFailure]:
        """How this worker failed (from its error record and exit status), or ``None``.

        The failure's time is the earlier of the record's and the observed
        exit, so that a rank that raised first is the root cause even if a
        peer's process ended before it.
        """
        code = self.process.returncode
        record = read_error_file(self.error_file) or read_torch_error_file(torch_error_file(self.error_file))
        if record is None and (code is None or code == 0):
            return None
        when = self.exit_time or time.time()
        host = socket.gethostname()  # the worker ran here; its record may name the host too
        fields: dict = {}
        if record is not None:
            when = min(when, float(record.get("timestamp", when)))
            host = str(record.get("host") or host)
            fields = dict(exc_type=record.get("exc_type"), message=str(record.get("message", "")),
                          traceback=str(record.get("traceback", "")))
            if not fields["exc_type"]:
                fields["exitcode"] = int(record.get("exitcode") or code or 1)
        if code is not None and code < 0 and record is None:
            return WorkerFailure(rank=self.rank, timestamp=when, signal_name=signal_name(-code),
                                 host=host)
        # With a record, the worker was already failing in its own way (an exception, an
        # exit code) when a signal (our teardown's, while it exited) ended it: say so.
        if "exitcode" not in fields:
            fields["exitcode"] = 1 if code is None else (code if code >= 0 else 128 - code)
        return WorkerFailure(rank=self.rank, timestamp=when, host=host, **fields)


def stop_workers(workers: Sequence[WorkerProcess], first_signal: int, grace: float,
                 cut_short: Callable[[], bool] = lambda: False) -> None:
    """Stop every worker and its group (see :func:`~distrib.launcher._process.stop_processes`).

    ``first_signal`` first, SIGKILL to what outlives ``grace`` seconds;
    returns once every worker is reaped. ``cut_short()`` returning True ends
    the grace period early (a second Ctrl-C to the launcher).
    """
    stop_processes(workers, first_signal, grace, cut_short)
    for w in workers:
        w.poll()
