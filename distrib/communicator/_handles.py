"""Communicators named by integers, and whether torch.compile is tracing the current call.

A graph that torch.compile traces holds numbers, not Python objects: the
operators of :mod:`._ops` name the communicator to use by its handle, and
find it here when the compiled code runs. Every communicator (the dispatcher
included) gets a handle when it is made: per process, in creation order,
never reused. An entry lives as long as the communicator does (the registry
holds it weakly); a closed communicator keeps its handle, so that a call
through it says "closed" rather than "unknown".

Nothing here imports torch: a process that never imports it pays nothing.
"""
from __future__ import annotations

import itertools
import sys
import weakref
from typing import Any

from ..errors import CommunicatorError

__all__ = ["compiling", "lookup", "register"]

_live: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_numbers = itertools.count(1)


def register(comm: Any) -> int:
    """A new handle for ``comm``."""
    handle = next(_numbers)
    _live[handle] = comm
    return handle


def lookup(handle: int) -> Any:
    """The communicator with this handle; raises :class:`CommunicatorError` if there is none."""
    try:
        return _live[handle]
    except KeyError:
        raise CommunicatorError(
            f"no communicator has handle {handle} in this process: it was deleted, or the compiled "
            "code came from another process. Keep the communicator alive while code compiled "
            "with it runs.") from None


def compiling() -> bool:
    """True while torch.compile (Dynamo) traces the calling code; False when torch is not imported."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()
