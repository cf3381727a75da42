"""How command launchers report failures: the summary text and the exit status."""
from __future__ import annotations

import signal

from ..errors import WorkerFailedError, WorkerFailure

__all__ = ["exit_code_of", "failure_summary"]

TRACEBACK_LINES = 12  # how much of each failed rank's traceback the summary shows


def exit_code_of(failure: WorkerFailure) -> int:
    """The process exit status that reports ``failure`` (128 + number for a signal, as shells do).

    A rank that raised reports 1, as Python exits on an uncaught exception,
    also when the teardown's SIGTERM reached it while it was exiting (its own
    status is then 143; seen once in 12 runs of a debug-mode mismatch). A
    program that wrote an error file and exited with its own code keeps it.
    """
    if failure.exc_type and failure.exitcode in (128 + signal.SIGTERM, -signal.SIGTERM):
        return 1
    if failure.signal_name:
        try:
            return 128 + int(signal.Signals[failure.signal_name])
        except KeyError:
            return 1
    return failure.exitcode if failure.exitcode else 1


def failure_summary(error: WorkerFailedError, tail: int = TRACEBACK_LINES) -> str:
    """Every failed rank, the root cause (the earliest failure) first and marked.

    Each entry gives the rank, its host when known, its exception or exit
    code or signal name, and the last ``tail`` lines of its traceback.
    """
    failures = error.failures
    earlier = error.earlier_attempts  # (attempt, cause) before restarts
    lines = [f"distrib-run: attempt {k} failed: {cause}" for k, cause in earlier]
    if earlier:
        lines.append(f"distrib-run: attempt {len(earlier)} (the last) failed too; gave up after "
                     f"{len(earlier)} restart{'s' if len(earlier) != 1 else ''}")
    lines += [f"distrib-run: {len(failures)} rank{'s' if len(failures) != 1 else ''} failed "
              f"(the first failure is the root cause)"]
    for failure in failures:
        mark = " [root cause]" if failure is error.root_cause else ""
        lines.append(f"  {failure.describe()}; exit code {exit_code_of(failure)}{mark}")
        if failure.traceback:
            body = failure.traceback.rstrip().splitlines()
            if len(body) > tail:
                lines.append(f"    ... ({len(body) - tail} earlier lines)")
            lines += [f"    {line}" for line in body[-tail:]]
    lines.append(f"distrib-run: exiting with code {exit_code_of(error.root_cause)}, "
                 f"that of rank {error.root_cause.rank} (the root cause)")
    return "\n".join(lines)
