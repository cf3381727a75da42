"""The Launcher interface: start the processes of one launch.

A launcher starts ``nprocs`` processes on this node, gives each one its
:class:`~distrib.info.LaunchInfo` through the environment, watches them, and
tears every one of them down when any fails, when the launch times out, or
when the launching process is interrupted. It returns the per-rank results
in rank order, or raises :class:`~distrib.errors.WorkerFailedError` naming
the root-cause rank.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

from ..registry import Registry

__all__ = ["Launcher", "launchers"]


class Launcher(ABC):
    """Starts and supervises the worker processes of one launch on this node."""

    name: ClassVar[str] = "abstract"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """``None`` if this launcher can run here, else why not."""
        return None

    @abstractmethod
    def run(self, target: Any, nprocs: int, **options: Any) -> list[Any]:
        """Run ``target`` in ``nprocs`` processes; return per-rank results in rank order.

        What ``target`` is depends on the launcher (a picklable callable for
        the multiprocessing launcher, a command line for a subprocess one).
        """


launchers: Registry[type[Launcher]] = Registry("launcher", "distrib.launchers")
