"""The one exception family of distrib.

Every error the framework raises on purpose is a :class:`DistribError`, so a
caller can catch the whole family with one ``except``. Messages say what was
wrong, what was expected, and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = [
    "DistribError",
    "ConfigError",
    "LaunchError",
    "DistribTimeoutError",
    "CoordinatorError",
    "CommunicatorError",
    "WorkerFailure",
    "WorkerFailedError",
]


class DistribError(Exception):
    """Base class of every error distrib raises on purpose."""


class ConfigError(DistribError, ValueError):
    """The environment or an argument is missing, malformed or inconsistent."""


class LaunchError(DistribError):
    """Processes could not be started."""


class DistribTimeoutError(DistribError, TimeoutError):
    """A bounded wait expired. ``missing`` lists the ranks that never arrived."""

    def __init__(self, message: str, missing: Sequence[int] = ()):
        super().__init__(message)
        self.missing = tuple(missing)


class CoordinatorError(DistribError):
    """A control-plane operation failed (a peer died, the store went away …)."""


class CommunicatorError(DistribError):
    """A communicator could not be created or a data operation failed."""


@dataclass(frozen=True)
class WorkerFailure:
    """How one worker process failed.

    Exactly one of (``exc_type``, ``signal_name``, ``exitcode``) explains it:
    a Python exception, a signal, or a non-zero exit without an exception.
    ``timestamp`` is the wall-clock time the failure was observed; the
    earliest one is the root cause.
    """

    rank: int
    timestamp: float
    exitcode: Optional[int] = None
    signal_name: Optional[str] = None
    exc_type: Optional[str] = None
    message: str = ""
    traceback: str = ""
    host: str = ""

    def describe(self) -> str:
        where = f"rank {self.rank}" + (f" on {self.host}" if self.host else "")
        if self.exc_type:
            return f"{where} raised {self.exc_type}: {self.message}"
        if self.signal_name:
            return f"{where} was killed by signal {self.signal_name}" + (f" ({self.message})" if self.message else "")
        return f"{where} exited with code {self.exitcode}" + (
            f" ({self.message})" if self.message else ""
        )

    @property
    def follows_a_peer(self) -> bool:
        """True for a Coordinator or Communicator error: what a rank raises when a peer is lost.

        Such a failure is a consequence when another rank died on its own (a
        signal, an exit, another exception); it is the root cause only when no
        other rank failed first in its own right (a rank that hung, say).
        """
        return bool(self.exc_type and self.exc_type.rsplit(".", 1)[-1] in _PEER_ERRORS)


_PEER_ERRORS = ("CoordinatorError", "CommunicatorError", "DistribTimeoutError")


class WorkerFailedError(DistribError):
    """One or more workers failed; the first failure is the root cause.

    ``failures`` holds every failed rank, earliest first, except that a rank
    which only reports a lost peer (:attr:`WorkerFailure.follows_a_peer`) comes
    after every rank that failed in its own right; ``root_cause`` is
    ``failures[0]``. ``earlier_attempts`` holds ``(attempt, cause)`` of the
    attempts a launcher restarted before this last one (``--max-restarts``).
    """

    earlier_attempts: tuple = ()

    def __init__(self, failures: Sequence[WorkerFailure]):
        if not failures:
            raise ValueError("WorkerFailedError needs at least one failure")
        # A rank that lost a peer may report it before the launcher sees the peer's own
        # death (a signal, an exit): the peer's failure is the root cause all the same.
        self.failures = tuple(sorted(failures, key=lambda f: (f.follows_a_peer, f.timestamp, f.rank)))
        self.root_cause = self.failures[0]
        super().__init__(self._render())

    @property
    def rank(self) -> int:
        return self.root_cause.rank

    def _render(self) -> str:
        root = self.root_cause
        lines = [f"{root.describe()} (root cause)"]
        others = [f for f in self.failures[1:]]
        if others:
            lines.append("other failed ranks:")
            lines += [f"  {f.describe()}" for f in others]
        if root.traceback:
            lines.append(f"--- traceback of rank {root.rank} ---")
            lines.append(root.traceback.rstrip())
        return "\n".join(lines)
