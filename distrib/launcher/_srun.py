"""One ``srun`` step as ``distrib-run --launcher slurm`` runs it.

srun labels each task's lines (``--label``: ``3: ...``); the relay rewrites
the label to distrib's ``[3] ...``, filters ranks, and keeps per-rank logs.
srun's own reports of ended tasks (``task 1: Exited with exit code 2``,
``tasks 0,2: Killed``) and the tasks' error records tell who failed first.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from typing import BinaryIO, Optional

from ..errors import DistribTimeoutError, LaunchError, WorkerFailedError, WorkerFailure
from ._errorfile import read_error_file
from ._output import log_file_path
from ._process import record_stop_signals, restore_signals, signal_name
from .api import CommandOptions, LaunchInterrupted

__all__ = ["SrunStep"]

# srun's --label prefix ("3: ") and its reports of ended tasks.
_LABEL = re.compile(rb"^\s*(\d+): ")
# srun's and slurmstepd's words for "stopping the step's tasks now".
_TEARDOWN = re.compile(rb"Terminating StepId|forcing job termination|Job step aborted|CANCELLED AT")
_TASK_END = re.compile(r"srun: error: (?P<host>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$")



class SrunStep:
    """One srun step: relay its labelled output, forward signals, and explain failures."""

    def __init__(self, argv, env, options: CommandOptions, error_dir: str, stdout, stderr):
        self.argv, self.env, self.options = argv, env, options
        self.error_dir = error_dir
        self.stdout, self.stderr = stdout, stderr
        self.task_ends: list[tuple[float, str, list[int], str]] = []  # (time, host, ranks, what)
        self.signals: list[int] = []
        self.teardown_at: Optional[float] = None  # when SLURM began to stop the step's tasks
        self._logs: dict[int, BinaryIO] = {}
        self._lock = threading.Lock()

    def run(self) -> list[int]:
        try:
            process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise LaunchError(f"could not start srun ({self.argv[0]}): {exc}") from exc
        previous = record_stop_signals(self.signals)
        readers = [threading.Thread(target=self._relay, args=(process.stdout, self.stdout), daemon=True),
                   threading.Thread(target=self._relay, args=(process.stderr, self.stderr), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            code = self._wait(process)
        finally:
            restore_signals(previous)
            for reader in readers:
                reader.join(timeout=5)
            for log in self._logs.values():
                log.close()
        if code == 0:
            return []
        raise WorkerFailedError(self._failures(code))

    def _wait(self, process: subprocess.Popen) -> int:
        deadline = None if self.options.timeout is None else time.monotonic() + self.options.timeout
        while True:
            try:
                return process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            if self.signals:
                signum = self.signals[0]
                if signum == signal.SIGINT:
                    # srun answers a lone SIGINT with a status report; a second one within a
                    # second makes it send Ctrl-C (SIGINT) to every task.
                    process.send_signal(signal.SIGINT)
                    time.sleep(0.2)
                # srun answers SIGTERM by cancelling the step: SLURM signals every task.
                process.send_signal(signum)
                self._finish_within_grace(process)
                raise LaunchInterrupted(signum, (
                    f"received {signal_name(signum)}; passed it to every task through "
                    "srun and stopped the step"))
            if deadline is not None and time.monotonic() >= deadline:
                process.terminate()
                self._finish_within_grace(process)
                raise DistribTimeoutError(
                    f"launch timed out after {self.options.timeout:g}s; the srun step was stopped")

    def _finish_within_grace(self, process: subprocess.Popen) -> None:
        try:
            process.wait(timeout=self.options.grace)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # a second signal: srun cancels the step
            try:
                process.wait(timeout=self.options.grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _relay(self, pipe, console) -> None:
        """Rewrite srun's ``N: `` labels to ``[N] ``, filter ranks, keep logs, note task ends."""
        show = self.options.show_ranks
        for line in iter(pipe.readline, b""):
            if self.teardown_at is None and _TEARDOWN.search(line):
                self.teardown_at = time.time()
            match = _LABEL.match(line)
            if match is None:  # srun's own message
                self._note_task_end(line)
                out = line
            else:
                rank = int(match.group(1))
                body = line[match.end():]
                self._log(rank, body)
                if show is not None and rank not in show:
                    continue
                out = b"[%d] " % rank + body
            with self._lock:
                try:
                    console.write(out if out.endswith(b"\n") else out + b"\n")
                    console.flush()
                except (OSError, ValueError):
                    pass
        pipe.close()

    def _log(self, rank: int, body: bytes) -> None:
        if not self.options.log_dir:
            return
        with self._lock:
            log = self._logs.get(rank)
            if log is None:
                log = self._logs[rank] = open(log_file_path(self.options.log_dir, rank), "ab")
            log.write(body)

    def _note_task_end(self, line: bytes) -> None:
        match = _TASK_END.search(line.decode(errors="replace").rstrip())
        if match is None:
            return
        ranks: list[int] = []
        for part in match.group("tasks").split(","):
            low, _, high = part.partition("-")
            ranks += range(int(low), int(high or low) + 1)
        self.task_ends.append((time.time(), match.group("host"), ranks, match.group("what")))

    def _failures(self, srun_code: int) -> list[WorkerFailure]:
        """Failed tasks from their error records and srun's reports, earliest first."""
        failures: dict[int, WorkerFailure] = {}
        for when, host, ranks, what in self.task_ends:
            for rank in ranks:
                failure = _failure_from_report(rank, when, host, what)
                stopped = (failure.signal_name is not None and self.teardown_at is not None
                           and when >= self.teardown_at)
                if rank not in failures and not stopped:  # not killed by the step's teardown
                    failures[rank] = failure
        for name in os.listdir(self.error_dir):
            found = re.fullmatch(r"rank(\d+)\.json", name)
            record = read_error_file(os.path.join(self.error_dir, name)) if found else None
            if found is None or record is None:
                continue
            rank = int(found.group(1))
            seen = failures.get(rank)
            when = float(record.get("timestamp", time.time()))
            if seen is not None:
                when = min(when, seen.timestamp)
            failures[rank] = WorkerFailure(
                rank=rank, timestamp=when, exitcode=int(record.get("exitcode", 1)),
                exc_type=record.get("exc_type"), message=str(record.get("message", "")),
                traceback=str(record.get("traceback", "")), host=str(record.get("host", "")))
        if not failures:  # srun failed before any task reported (bad options, no allocation …)
            failures[0] = WorkerFailure(rank=0, timestamp=time.time(), exitcode=srun_code,
                                        message="srun failed before any task ended; see its "
                                                "messages above")
        return list(failures.values())


def _failure_from_report(rank: int, when: float, host: str, what: str) -> WorkerFailure:
    """A WorkerFailure from srun's ``task N: <what>`` report."""
    exited = re.match(r"Exited with exit code (\d+)", what)
    if exited:
        return WorkerFailure(rank=rank, timestamp=when, exitcode=int(exited.group(1)), host=host)
    names = {"Killed": "SIGKILL", "Terminated": "SIGTERM", "Interrupt": "SIGINT",
             "Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT"}
    for text, name in names.items():
        if what.startswith(text):
            return WorkerFailure(rank=rank, timestamp=when, signal_name=name, host=host)
    return WorkerFailure(rank=rank, timestamp=when, exitcode=1, host=host, message=what)
