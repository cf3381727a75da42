"""Per-process runtime: :func:`init` and :func:`shutdown`.

``init()`` reads this process's LaunchInfo from the environment, starts the
Coordinator once, and returns a :class:`Context`. Calling it again returns
the same context. A process started without any launcher (plain
``python script.py``) is a world of one.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from .coordinator.api import Coordinator, coordinators
from .errors import ConfigError
from .info import LaunchInfo

__all__ = ["Context", "init", "shutdown", "get_context", "is_initialized", "environment_sources",
           "detect_environment"]


@dataclass(frozen=True)
class Context:
    """What ``distrib.init()`` returns: who this process is, and how to talk to the others."""

    info: LaunchInfo
    coordinator: Coordinator
    device: Optional[int] = None  # the GPU index the launcher gave this rank, if any

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size


_lock = threading.Lock()
_context: Optional[Context] = None

# Functions that may recognise a scheduler's environment (SLURM, …) and
# return the LaunchInfo variables it implies, or None. A source returns None
# when a launcher has already set the variables, and raises ConfigError when
# explicit variables contradict it; otherwise explicit variables win. See
# detect_environment.
environment_sources: list = []

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init(coordinator: str = "gloo", timeout: Optional[float] = None) -> Context:
    """Start (once) and return this process's distrib context.

    ``coordinator`` names a registered Coordinator; ``timeout`` is its
    default for blocking calls (seconds).
    """
    global _context
    with _lock:
        if _context is not None:
            return _context
        info, store = _resolve_info(os.environ), None
        if info is None:
            info, store = _single_process()
            logging.getLogger("distrib").warning(
                "distrib: no launcher started this process (RANK and WORLD_SIZE are not set), so it "
                "runs as a world of one rank; start it with distrib-run or distrib.launch for more")
        # A registered coordinator takes timeout= (and store=) besides the base's arguments.
        cls: Callable[..., Coordinator] = coordinators.get(coordinator)
        # A world of one hosts its own store (already bound); others reach theirs by address.
        coord = cls(info, timeout=timeout) if store is None else cls(info, timeout=timeout, store=store)
        device = os.environ.get("DISTRIB_DEVICE")
        _context = Context(info=info, coordinator=coord,
                           device=int(device) if device not in (None, "") else None)
        return _context


def get_context() -> Context:
    """The context made by :func:`init`; raises if ``init`` has not run."""
    if _context is None:
        raise ConfigError("distrib.init() has not been called in this process")
    return _context


def is_initialized() -> bool:
    return _context is not None


def shutdown() -> None:
    """Close this process's coordinator. Idempotent; not a collective."""
    global _context
    with _lock:
        ctx, _context = _context, None
    if ctx is not None:
        ctx.coordinator.close()


atexit.register(shutdown)


def detect_environment(environ: Mapping[str, str]) -> Optional[LaunchInfo]:
    """The LaunchInfo a scheduler's environment implies (explicit variables win), or None."""
    from .launcher import slurm  # noqa: F401  (registers SLURM detection)

    for source in environment_sources:
        detected = source(environ)
        if detected is not None:
            return LaunchInfo.from_env({**detected, **environ})
    return None


def _resolve_info(environ: Mapping[str, str]) -> Optional[LaunchInfo]:
    """This process's LaunchInfo, or None when no launcher started it."""
    detected = detect_environment(environ)
    if detected is not None:
        return detected
    if not any(environ.get(v) for v in _LAUNCH_VARS):
        return None
    return LaunchInfo.from_env(environ)


def _single_process():
    """A world of one, for a program run without any launcher.

    It is its own launcher: the store is bound while its port is chosen (no
    pick-then-release window), and handed to the coordinator.
    """
    from ._store import host_store

    launch_id = f"single-{os.getpid()}-{secrets.token_hex(4)}"
    store, port = host_store(launch_id, 1)
    info = LaunchInfo(launch_id=launch_id, rank=0, world_size=1, local_rank=0, local_world_size=1,
                      node_rank=0, nnodes=1, master_addr="127.0.0.1", master_port=port,
                      secret=secrets.token_hex(16))
    return info, store
