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
import errno
import ipaddress
import logging
import os
import socket
import sys

from .errors import ConfigError, CoordinatorError, LaunchError
from .info import LaunchInfo
from .ports import AddressInUse, bind_first_free, is_address_in_use

AGENT_STORE_VAR = "TORCHELASTIC_USE_AGENT_STORE"
BIND_ADDR_VAR = "DISTRIB_BIND_ADDR"  # an address to listen on instead of MASTER_ADDR's

logger = logging.getLogger("distrib")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def store_host(master_addr: str, nnodes: int) -> str:
    """The address the store listens on: ``DISTRIB_BIND_ADDR`` if set, else MASTER_ADDR's.

    MASTER_ADDR is, by contract, an address of the store's host that every
    node reaches (127.0.0.1 for a one-machine launch), so the store listens
    there and nowhere else. A multi-node launch whose MASTER_ADDR resolves to
    a loopback address here (a host name mapped to 127.0.1.1 in /etc/hosts)
    cannot listen there, since the other nodes would not reach it; it listens
    on every interface and says so, unless ``DISTRIB_BIND_ADDR`` names one.
    """
    explicit = os.environ.get(BIND_ADDR_VAR)
    if explicit:
        return explicit
    address = _resolve(master_addr or "127.0.0.1")
    if nnodes > 1 and ipaddress.ip_address(address.split("%")[0]).is_loopback \
            and not ipaddress.ip_address(_literal(master_addr) or "::1").is_loopback:
        logger.warning("MASTER_ADDR=%s resolves to the loopback address %s on this host, which the "
                       "other nodes cannot reach: the rendezvous store listens on every interface. "
                       "Set %s to this host's address on the nodes' network to avoid that.",
                       master_addr, address, BIND_ADDR_VAR)
        return "0.0.0.0"
    return address


def _resolve(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError) as exc:
        raise ConfigError(f"the store's address {host!r} does not resolve on this host ({exc}); "
                          f"expected an address of this host, or set {BIND_ADDR_VAR}") from None


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return None


def bind_listener(launch_id: str, port: int | None = None,
                  host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """Bind and listen on the store's port now, before torch is imported. Returns ``(socket, port)``.

    ``host`` is the one address to listen on (see :func:`store_host`); a
    wildcard (``0.0.0.0``, ``::``) only when asked for. The port is chosen as
    :func:`host_store` does. A launcher can start its workers at once and pass
    the socket to ``host_store(listener=...)`` later: clients that connect in
    between wait in the listen backlog.
    """
    address = _resolve(host)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def bind(candidate: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6 and address == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, candidate))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if is_address_in_use(exc):
                raise AddressInUse(candidate) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"the rendezvous store cannot listen on {address} ({exc}): it is "
                                  f"not an address of this host; expected MASTER_ADDR (or "
                                  f"{BIND_ADDR_VAR}) to name this host") from None
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


def listen_if_free(port: int, host: str) -> socket.socket | None:
    """A listening socket on ``host:port``, or None if the port is taken there (another process
    of this host has it: for a node of a launch, the node that hosts the store)."""
    try:
        return bind_listener("", port, host)[0]
    except ConfigError:
        if is_port_taken(port, host):
            return None
        raise


def is_port_taken(port: int, host: str) -> bool:
    address = _resolve(host)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            return is_address_in_use(exc)
    return False


def host_store(launch_id: str, world_size: int, port: int | None = None, timeout: float = 300.0,
               listener: socket.socket | None = None, host: str = "127.0.0.1"):
    """Bind a TCPStore server for a launcher. Returns ``(store, port)``.

    The store listens on ``host`` only (see :func:`store_host`). With
    ``port=None`` the port comes from the launch id (hash, then probe
    upward); an explicit port that is taken is an error. With ``listener``
    (from :func:`bind_listener`) the store takes over that socket instead.
    """
    from torch.distributed import TCPStore

    if listener is None:
        listener, _ = bind_listener(launch_id, port, host)
    address, bound = listener.getsockname()[:2]
    # TCPStore's own listener would take every interface; handed a bound socket, it
    # listens where that socket does. detach(): the store owns the descriptor now.
    client_address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    store = TCPStore(client_address, bound, world_size, is_master=True, wait_for_workers=False,
                     timeout=_timedelta(timeout), master_listen_fd=listener.detach())
    return store, bound


class OneNodeStore:
    """The store of a one-node launch, as its launcher holds it (see :func:`one_node_store`)."""

    def check(self) -> None:
        """Raise LaunchError if the store has failed."""

    def close(self) -> None:
        """End the store (its clients, the workers, are gone by now). Idempotent."""


def one_node_store(listener: socket.socket, timeout: float = 300.0) -> OneNodeStore:
    """Host a one-node launch's store on ``listener`` (from :func:`bind_listener`).

    In this process if torch is imported here already (the store then costs
    nothing, and the process's exit pays for torch anyway); otherwise in a
    helper process (:class:`StoreProcess`), so that the launcher never waits
    for torch to import, nor to tear down at exit.
    """
    if "torch" in sys.modules:
        return _StoreHere(listener, timeout)
    return StoreProcess(listener, timeout)


class _StoreHere(OneNodeStore):
    def __init__(self, listener: socket.socket, timeout: float):
        self._store, _ = host_store("", 1, timeout=timeout, listener=listener)

    def close(self) -> None:
        self._store = None  # the server stops with its last reference


class StoreProcess(OneNodeStore):
    """A launcher's one-node store, hosted by a small helper process of its own.

    The store is torch's TCPStore, and importing torch takes seconds under
    load and keeps the importing process slow to exit (its teardown walks
    every object of a thousand modules). In a helper, neither is the
    launcher's: it supervises its workers from the start, acts on a rank's
    failure or a Ctrl-C at once, and exits in milliseconds (``distrib.launch``
    runs in the user's own process, which need not import torch at all).
    ``listener`` (from :func:`bind_listener`) is bound already and passed on,
    so workers that connect before the store is up wait in its listen backlog.

    The helper lives in its own session (a terminal's Ctrl-C is the launcher's
    to handle), and ends when the launcher closes it or dies: its stdin is a
    pipe from the launcher, and its end of file ends the helper (on Linux the
    kernel also kills it when the launcher dies, PR_SET_PDEATHSIG).
    """

    def __init__(self, listener: socket.socket, timeout: float = 300.0):
        import subprocess

        self._closed = False
        # The launcher's own import path, so that the helper finds the torch it would.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _STORE_SOURCE, str(listener.fileno()), repr(float(timeout)),
             str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            pass_fds=(listener.fileno(),), start_new_session=True)
        listener.close()  # the helper holds the socket now

    @property
    def pid(self) -> int:
        return self._process.pid

    def check(self) -> None:
        """Raise LaunchError if the helper has ended (it could not host the store)."""
        if self._closed or self._process.poll() is None:
            return
        stderr = self._process.stderr
        error = stderr.read().decode(errors="replace").strip() if stderr is not None else ""
        self.close()
        raise LaunchError(f"could not start the rendezvous store (its process exited with status "
                          f"{self._process.returncode}): {error[-2000:] or 'no message'}")

    def close(self) -> None:
        """End the helper (its clients, the workers, are gone by now). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._process.kill()  # nothing of it needs a clean exit, and it may still be importing torch
        self._process.wait()
        for stream in (self._process.stdin, self._process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


# The helper's whole program: ``python -c _STORE_SOURCE <listening fd> <timeout s> <launcher pid>``.
_STORE_SOURCE = """
import datetime, os, socket, sys, threading

if sys.platform.startswith("linux"):
    # Die with the launcher at once, even while importing torch (which holds the GIL
    # for a while at a time, so the thread below may take a moment to see the pipe end).
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[3]):
        os._exit(0)  # the launcher died before that

def end_with_launcher():
    sys.stdin.buffer.read()  # returns when the launcher closes the pipe, or dies
    os._exit(0)

threading.Thread(target=end_with_launcher, daemon=True).start()
from torch.distributed import TCPStore

listener = socket.socket(fileno=int(sys.argv[1]))
address, port = listener.getsockname()[:2]
# Handed a bound socket, TCPStore listens where that socket does.
store = TCPStore({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address), port, 1, is_master=True,
                 wait_for_workers=False, timeout=datetime.timedelta(seconds=float(sys.argv[2])),
                 master_listen_fd=listener.detach())
threading.Event().wait()
"""


def connect_store(info: LaunchInfo, timeout: float, client: bool = False):
    """The store for a worker process: a client, or (rank 0 without an agent) the host.

    ``client=True``: a client in every case (a further connection, to a store
    this launch already hosts).
    """
    from torch.distributed import TCPStore

    hosted_by_launcher = os.environ.get(AGENT_STORE_VAR) == "True"
    is_host = info.rank == 0 and not hosted_by_launcher and not client
    try:
        if not is_host:
            return TCPStore(info.master_addr, info.master_port, info.world_size,
                            is_master=False, wait_for_workers=False, timeout=_timedelta(timeout))
        # Rank 0 hosts it (no launcher beside the ranks), on MASTER_ADDR's address only;
        # multi-tenant, so that init_process_group("env://") here shares it.
        listener, _ = bind_listener(info.launch_id, info.master_port,
                                    store_host(info.master_addr, info.nnodes))
        address = listener.getsockname()[0]
        return TCPStore({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address),
                        info.master_port, info.world_size, is_master=True, wait_for_workers=False,
                        multi_tenant=True, timeout=_timedelta(timeout),
                        master_listen_fd=listener.detach())
    except Exception as exc:
        role = "host" if is_host else "connect to"
        raise CoordinatorError(
            f"rank {info.rank} could not {role} the rendezvous store at "
            f"{info.master_addr}:{info.master_port} within {timeout:g}s: {exc}. "
            "Check that MASTER_ADDR is reachable from this node and MASTER_PORT is free on "
            "the master node."
        ) from exc
