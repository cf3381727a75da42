"""distrib: run one program as many cooperating processes, and reduce tensors between them fast.

Three layers, each behind one small interface:

- :mod:`distrib.launcher`    starts the processes (``distrib.launch``, ``distrib-run``)
- :mod:`distrib.coordinator` small control messages: barrier, broadcast, all_gather
- :mod:`distrib.communicator` tensor data between devices: all_reduce and friends

and :mod:`distrib.parallel`, which arranges a launch's ranks in TP, PP and DP groups.
"""
from .errors import (
    CommunicatorError,
    ConfigError,
    CoordinatorError,
    DistribError,
    DistribTimeoutError,
    LaunchError,
    WorkerFailedError,
    WorkerFailure,
)
from .info import LaunchInfo
from . import parallel
from .launcher import launch
from .runtime import Context, get_context, init, is_initialized, shutdown

__version__ = "0.1.0"


def __getattr__(name: str):
    """``distrib.communicator`` (and the other layers) without importing them up front."""
    if name in ("communicator", "coordinator", "control", "testing"):
        from importlib import import_module

        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'distrib' has no attribute {name!r}")

__all__ = [
    "CommunicatorError",
    "ConfigError",
    "Context",
    "CoordinatorError",
    "DistribError",
    "DistribTimeoutError",
    "LaunchError",
    "LaunchInfo",
    "WorkerFailedError",
    "WorkerFailure",
    "get_context",
    "init",
    "is_initialized",
    "launch",
    "parallel",
    "shutdown",
]
