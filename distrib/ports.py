"""Rendezvous ports derived from the launch id.

A launch hashes its ``launch_id`` into a port range and probes upward from
there, so concurrent launches on one host start from different ports and a
crashed run does not poison the next one's default. The probe *is* the bind:
:func:`bind_first_free` hands each candidate to a function that binds it and
keeps it bound, and moves on only when that bind fails with ``EADDRINUSE``.
There is no pick-then-release window for another launch to steal the port.
"""
from __future__ import annotations

import errno
import hashlib
from typing import Callable, Iterator, TypeVar

from .errors import LaunchError

__all__ = ["PORT_RANGE", "port_for_launch_id", "candidate_ports", "bind_first_free", "AddressInUse"]

# Below Linux's default ephemeral range (32768-60999), so an outgoing
# connection's local port never takes a rendezvous port.
PORT_RANGE = (20000, 32000)

T = TypeVar("T")


class AddressInUse(Exception):
    """Raised by a bind function when its candidate port is taken."""


def port_for_launch_id(launch_id: str, port_range: tuple[int, int] = PORT_RANGE) -> int:
    """The first candidate port for ``launch_id`` (a stable hash into the range)."""
    low, high = port_range
    digest = hashlib.sha256(launch_id.encode()).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low)


def candidate_ports(launch_id: str, attempts: int = 128,
                    port_range: tuple[int, int] = PORT_RANGE) -> Iterator[int]:
    """``attempts`` ports: the hashed one, then upward, wrapping inside the range."""
    low, high = port_range
    first = port_for_launch_id(launch_id, port_range)
    for i in range(min(attempts, high - low)):
        yield low + (first - low + i) % (high - low)


def bind_first_free(launch_id: str, bind: Callable[[int], T], attempts: int = 128) -> T:
    """Call ``bind(port)`` on each candidate until one does not raise AddressInUse."""
    tried = []
    for port in candidate_ports(launch_id, attempts):
        try:
            return bind(port)
        except AddressInUse:
            tried.append(port)
    raise LaunchError(
        f"no free rendezvous port for launch {launch_id!r}: tried {len(tried)} ports from "
        f"{tried[0] if tried else '?'} upward, all in use. Free some ports or pass an explicit "
        "master port."
    )


def is_address_in_use(exc: BaseException) -> bool:
    """True if ``exc`` (an OSError or a torch store error) says EADDRINUSE."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return True
    text = str(exc)
    return "EADDRINUSE" in text or "address already in use" in text.lower()
