"""The Launcher interface: start the processes of one launch.

A launcher starts ``nprocs`` processes on this node, gives each one its
:class:`~distrib.info.LaunchInfo` through the environment, watches them, and
tears every one of them down when any fails, when the launch times out, or
when the launching process is interrupted. It returns the per-rank results
in rank order, or raises :class:`~distrib.errors.WorkerFailedError` naming
the root-cause rank.

Two kinds exist: a :class:`Launcher` runs a Python callable
(``distrib.launch``); a :class:`CommandLauncher` runs a program given as a
command line (``distrib-run``), described by :class:`Command` and
:class:`CommandOptions`. ``distrib-run --launcher NAME`` accepts every
registered :class:`CommandLauncher`, so a new one is one module.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from ..errors import LaunchError
from ..registry import Registry

__all__ = ["Launcher", "CommandLauncher", "Command", "CommandOptions", "StreamSpec", "LaunchInterrupted",
           "launchers"]


class Launcher(ABC):
    """Starts and supervises the worker processes of one launch on this node."""

    name: ClassVar[str] = "abstract"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """``None`` if this launcher can run here, else why not."""
        return None

    @abstractmethod
    def run(self, target: Any, nprocs: Any, *args: Any, **options: Any) -> list[Any]:
        """Run ``target`` in ``nprocs`` processes; return per-rank results in rank order.

        What ``target`` is depends on the launcher (a picklable callable for
        the multiprocessing launcher, a command line for a subprocess one).
        """


@dataclass(frozen=True)
class Command:
    """The program every worker runs: a script path (or a module, ``module=True``) and its
    arguments; with ``no_python=True``, an executable run as it is (a shell script, a binary)."""

    program: str
    args: tuple[str, ...] = ()
    module: bool = False
    no_python: bool = False

    def bootstrap_argv(self, python: str = sys.executable) -> list[str]:
        """The worker's command line: the program run through distrib's bootstrap.

        The bootstrap records an uncaught exception for the launcher (see
        :mod:`distrib.launcher._bootstrap`), so no decorator is needed. An
        executable (``no_python``) runs directly: its exit code or signal is its report.
        """
        if self.no_python:
            return [self.program, *self.args]
        target = ["-m", self.program] if self.module else [self.program]
        return [python, "-m", "distrib.launcher._bootstrap", *target, *self.args]

    def __str__(self) -> str:
        return " ".join((["-m"] if self.module else []) + [self.program, *self.args])


STDOUT, STDERR = 1, 2  # stream bits, as torchrun's --redirects and --tee count them


@dataclass(frozen=True)
class StreamSpec:
    """Which output streams of which local ranks an option covers (torchrun's --redirects
    and --tee): ``every`` for every local rank, ``per_rank`` for some (bits: 1 stdout,
    2 stderr, 3 both)."""

    every: int = 0
    per_rank: Mapping[int, int] = field(default_factory=dict)

    def streams(self, local_rank: int) -> int:
        return self.per_rank.get(local_rank, self.every)

    def __bool__(self) -> bool:
        return bool(self.every or any(self.per_rank.values()))


@dataclass(frozen=True)
class CommandOptions:
    """What ``distrib-run`` tells a command launcher, beyond the command and ``nprocs``.

    ``nprocs`` counts processes per node (``None``: the launcher's natural
    default, e.g. SLURM's allocation). Times are in seconds.
    """

    nnodes: int = 1
    node_rank: Optional[int] = 0           # None: assigned as nodes join (the store's host is node 0)
    master_addr: Optional[str] = None      # None: this host (single node only)
    master_port: Optional[int] = None      # None: derived from launch_id
    launch_id: Optional[str] = None        # None: fresh per launch (single node)
    devices: Optional[tuple[int, ...]] = None  # None: one GPU per process if any are visible; (): none
    share_gpu: bool = False                # ranks may share GPUs (devices may repeat)
    log_dir: Optional[str] = None          # per-rank log files go here
    show_ranks: Optional[frozenset[int]] = None  # None: every rank's output on the console
    grace: float = 5.0                     # SIGTERM -> SIGKILL
    rdzv_timeout: float = 300.0            # how long nodes wait for each other
    timeout: Optional[float] = None        # bound on the whole launch
    heartbeat_timeout: Optional[float] = None  # silence before a rank is reported (None: 5 s)
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables for every worker
    max_restarts: int = 0                  # times every rank is started again after a failure
    local_addr: Optional[str] = None       # this node's address for the rendezvous
    redirects: StreamSpec = field(default_factory=StreamSpec)  # streams kept off the console
    local_ranks_filter: Optional[frozenset[int]] = None  # show only these local ranks' output


class CommandLauncher(Launcher):
    """A launcher that runs a :class:`Command` in fresh processes (``distrib-run``)."""

    @abstractmethod
    def run(self, target: Command, nprocs: Optional[int],
            options: CommandOptions = CommandOptions()) -> list[int]:
        """Run ``target`` in ``nprocs`` processes per node; return this node's exit codes (all 0).

        Raises :class:`~distrib.errors.WorkerFailedError` (root cause first)
        when a worker fails, :class:`~distrib.errors.DistribTimeoutError`
        when nodes do not meet or the launch outlives ``options.timeout``,
        and :class:`~distrib.errors.ConfigError` for options it cannot honour.
        """


class LaunchInterrupted(LaunchError):
    """The launcher was asked to stop (SIGINT, SIGTERM) and stopped every worker.

    ``exit_code`` follows the shell's convention for death by that signal (128 + number).
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


launchers: Registry[type[Launcher]] = Registry("launcher", "distrib.launchers")
