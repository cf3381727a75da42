"""Testing helpers for distrib and for anyone who writes a Communicator.

:mod:`.conformance` is a suite any :class:`~distrib.communicator.Communicator`
subclass runs against itself on N ranks.
"""
from .conformance import (
    DEFAULT_SHAPES,
    ConformanceError,
    ConformanceReport,
    launch_conformance,
    run_conformance,
)

__all__ = ["DEFAULT_SHAPES", "ConformanceError", "ConformanceReport", "launch_conformance",
           "run_conformance"]
