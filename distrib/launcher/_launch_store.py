"""The rendezvous store as a command launcher holds it, across every attempt of a launch.

On one node the launcher hosts a store of its own (:func:`~distrib._store.one_node_store`).
On several, node 0 hosts it and the others are clients; nodes given no number (torchrun's
``--rdzv-endpoint`` alone) number themselves as they connect, the one that can host the
store at the endpoint's address being node 0. The store outlives each attempt of a launch
(``--max-restarts``): attempts use keys of their own in it.
"""
from __future__ import annotations

import socket
import uuid
from typing import Callable, Optional

from .._store import OneNodeStore, one_node_store
from ..errors import ConfigError
from ._rendezvous import NodeRendezvous
from .api import CommandOptions

__all__ = ["LaunchStore"]


class LaunchStore:
    """The launch's rendezvous store as this node's distrib-run holds it, for every attempt.

    On one node: a store of its own (:func:`~distrib._store.one_node_store`).
    On several: node 0 hosts it, the others are clients. Nodes without a
    ``node_rank`` number themselves: the one that can host the store at
    ``master_addr`` (an address of its host, the port free) is node 0, the
    others take 1, 2, ... in the order they connect.
    """

    def __init__(self, store, launch_id: str, port: int, master_addr: str, node_rank: int):
        self.store, self.launch_id, self.port = store, launch_id, port
        self.master_addr, self.node_rank = master_addr, node_rank

    @classmethod
    def open(cls, options: CommandOptions, should_stop: Callable[[], None]) -> "LaunchStore":
        from .._store import bind_listener, host_store, listen_if_free, store_host
        from ..ports import port_for_launch_id

        if options.nnodes == 1:
            launch_id = options.launch_id or uuid.uuid4().hex
            master_addr = options.master_addr or "127.0.0.1"
            listener, port = bind_listener(launch_id, options.master_port,
                                           options.local_addr or store_host(master_addr, 1))
            return cls(one_node_store(listener, options.rdzv_timeout), launch_id, port, master_addr, 0)
        launch_id = options.launch_id or f"{options.master_addr}:{options.master_port}"
        # Every node derives the same port; no probing (the others could not follow).
        port = options.master_port if options.master_port is not None else port_for_launch_id(launch_id)
        master_addr, node_rank = options.master_addr or "", options.node_rank
        host = options.local_addr or store_host(master_addr, options.nnodes)
        if node_rank == 0:
            store, port = host_store(launch_id, options.nnodes, port=port, timeout=options.rdzv_timeout,
                                     host=host)
            return cls(store, launch_id, port, master_addr, 0)
        if node_rank is None and _is_this_host(master_addr, options.local_addr):
            # The first node of this host to take the port hosts; another node here joins it.
            free = listen_if_free(port, host)
            if free is not None:
                store, port = host_store(launch_id, options.nnodes, timeout=options.rdzv_timeout,
                                         listener=free)
                return cls(store, launch_id, port, master_addr, 0)
        store = NodeRendezvous.connect(master_addr, port, node_rank, options.rdzv_timeout,
                                       should_stop=should_stop)
        if node_rank is None:
            node_rank = NodeRendezvous.take_node_rank(store, launch_id, options.nnodes)
        return cls(store, launch_id, port, master_addr, node_rank)

    def check(self) -> None:
        if isinstance(self.store, OneNodeStore):
            self.store.check()

    def close(self) -> None:
        if isinstance(self.store, OneNodeStore):
            self.store.close()
        self.store = None


def _is_this_host(master_addr: str, local_addr: Optional[str]) -> bool:
    """Whether ``master_addr`` is an address of this host (and ``local_addr``'s, when given)."""
    from .._store import _resolve

    try:
        address = _resolve(master_addr)
        if local_addr and _resolve(local_addr) != address:
            return False
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))  # only an address of this host can be bound
        return True
    except (OSError, ConfigError):
        return False
