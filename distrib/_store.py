"""The rendezvous key-value store (torch's TCPStore) shared by launchers and
the gloo Coordinator.

Who hosts the store:
- a launcher that stays alive for the whole launch (``distrib.launch``,
  ``distrib-run``) hosts it itself, binding the port early so that nothing can
  take it, and tells workers with ``TORCHELASTIC_USE_AGENT_STORE=True`` (the
  variable torchrun uses, so that ``init_process_group("env://")`` in a worker
  connects as a client too);
- otherwise (SLURM's srun, a hand-set environment) rank 0 hosts it as a
  multi-tenant server, so a later ``init_process_group("env://")`` in rank 0
  shares it instead of failing to bind the same port.
"""
from __future__ import annotations

import datetime
import os
import socket

from .errors import ConfigError, CoordinatorError
from .info import LaunchInfo
from .ports import AddressInUse, bind_first_free, is_address_in_use

AGENT_STORE_VAR = "TORCHELASTIC_USE_AGENT_STORE"


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def bind_listener(launch_id: str, port: int | None = None) -> tuple[socket.socket, int]:
    """Bind and listen on the store's port now, before torch is imported. Returns ``(socket, port)``.

    Same port choice as :func:`host_store`. A launcher can start its workers
    at once and pass the socket to ``host_store(listener=...)`` later:
    clients that connect in between wait in the listen backlog.
    """
    def bind(candidate: int) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
            address = ("::", candidate)
        except OSError:  # no IPv6 on this host
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("0.0.0.0", candidate)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if is_address_in_use(exc):
                raise AddressInUse(candidate) from exc
            raise
        return sock

    if port is not None:
        try:
            return bind(port), port
        except AddressInUse:
            raise ConfigError(
                f"MASTER_PORT={port} is already in use on this host; expected a free port. "
                "Choose another, or leave the port unset to derive one from the launch id."
            ) from None
    sock = bind_first_free(launch_id, bind)
    return sock, sock.getsockname()[1]


def host_store(launch_id: str, world_size: int, port: int | None = None, timeout: float = 300.0,
               listener: socket.socket | None = None):
    """Bind a TCPStore server for a launcher. Returns ``(store, port)``.

    With ``port=None`` the port comes from the launch id (hash, then probe
    upward); an explicit port that is taken is an error. With ``listener``
    (from :func:`bind_listener`) the store takes over that socket instead.
    """
    from torch.distributed import TCPStore

    if listener is not None:
        bound = listener.getsockname()[1]
        # detach(): the store owns the descriptor from now on, and closes it.
        store = TCPStore("0.0.0.0", bound, world_size, is_master=True, wait_for_workers=False,
                         timeout=_timedelta(timeout), master_listen_fd=listener.detach())
        return store, bound

    def bind(candidate: int):
        try:
            return TCPStore("0.0.0.0", candidate, world_size, is_master=True,
                            wait_for_workers=False, timeout=_timedelta(timeout))
        except Exception as exc:  # torch raises DistNetworkError (a RuntimeError)
            if is_address_in_use(exc):
                raise AddressInUse(candidate) from exc
            raise

    if port is not None:
        try:
            store = bind(port)
        except AddressInUse:
            raise ConfigError(
                f"MASTER_PORT={port} is already in use on this host; expected a free port. "
                "Choose another, or leave the port unset to derive one from the launch id."
            ) from None
        return store, port
    store = bind_first_free(launch_id, bind)
    return store, store.port


def connect_store(info: LaunchInfo, timeout: float):
    """The store for a worker process: a client, or (rank 0 without an agent) the host."""
    from torch.distributed import TCPStore

    hosted_by_launcher = os.environ.get(AGENT_STORE_VAR) == "True"
    is_host = info.rank == 0 and not hosted_by_launcher
    try:
        return TCPStore(info.master_addr, info.master_port, info.world_size,
                        is_master=is_host, wait_for_workers=False, multi_tenant=is_host,
                        timeout=_timedelta(timeout))
    except Exception as exc:
        role = "host" if is_host else "connect to"
        raise CoordinatorError(
            f"rank {info.rank} could not {role} the rendezvous store at "
            f"{info.master_addr}:{info.master_port} within {timeout:g}s: {exc}. "
            "Check that MASTER_ADDR is reachable from this node and MASTER_PORT is free on "
            "the master node."
        ) from exc
