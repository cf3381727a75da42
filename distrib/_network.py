"""Which local address and interface reach a given host (for gloo across hosts).

Gloo's default device binds the address this host's *name* resolves to. On a
machine whose hostname resolves to an address the other nodes cannot reach
(a loopback alias, a container's address, a second network namespace), the
peers then connect to the wrong place. The address the kernel would use as
the source of a connection to MASTER_ADDR is, by construction, one the master
can reach back; these helpers find it without sending a packet.
"""
from __future__ import annotations

import socket
from typing import Optional

__all__ = ["local_address_towards", "interface_of", "loopback_gloo_env"]


def local_address_towards(host: str, port: int = 9) -> Optional[str]:
    """The local address of a connection to ``host`` (``None`` if it cannot be routed).

    A UDP ``connect`` only asks the kernel for a route; nothing is sent.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(address)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def interface_of(address: str) -> Optional[str]:
    """The name of the network interface that owns ``address`` (``None`` if none does)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses
               if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def loopback_gloo_env() -> dict[str, str]:
    """``GLOO_SOCKET_IFNAME`` naming the loopback interface, for a launch on one machine.

    Gloo's default device listens on the address the host name resolves to,
    which other machines may reach; every rank of a one-machine launch is
    here. Empty when the variable is already set (the caller's choice wins)
    or no loopback interface is found.
    """
    import os

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return {}
    name = interface_of("127.0.0.1")
    return {"GLOO_SOCKET_IFNAME": name} if name else {}
