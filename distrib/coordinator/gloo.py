"""The reference Coordinator: gloo through ``torch.distributed``.

It owns its own gloo process group, built directly on a prefixed view of the
rendezvous store, so it never initialises or changes the user's default
``torch.distributed`` group. Barriers run on the store itself (an arrival
counter per barrier and one key per rank), which is what lets a timeout name
the ranks that never arrived. Broadcast and all-gather run on gloo; before
each one a rank records how many collectives it has entered, so a gloo
timeout can name the ranks that are behind.
"""
from __future__ import annotations

import ctypes
import datetime
import os
from typing import Callable, Optional

from ..errors import CoordinatorError, DistribError, DistribTimeoutError
from .._text import format_ranks
from ..info import LaunchInfo
from .api import DEFAULT_TIMEOUT, Coordinator, coordinators

__all__ = ["GlooCoordinator"]


@coordinators.register("gloo")
class GlooCoordinator(Coordinator):
    """Coordinator on a private gloo process group and the rendezvous store."""

    name = "gloo"

    def __init__(self, info: LaunchInfo, timeout: Optional[float] = None, store=None):
        super().__init__(info)
        import torch
        import torch.distributed as dist

        from .._store import connect_store

        self._torch = torch
        self._dist = dist
        self.timeout = float(timeout if timeout is not None
                             else os.environ.get("DISTRIB_COORDINATOR_TIMEOUT", DEFAULT_TIMEOUT))
        self._root_store = store if store is not None else connect_store(info, self.timeout)
        self._store = dist.PrefixStore(f"distrib/{info.launch_id}/coordinator", self._root_store)
        self._collectives = 0  # gloo collectives entered by this rank
        self._barriers: dict[str, int] = {}  # barrier scope -> generation
        self._closed = False
        self._broken: Optional[str] = None

        # Record arrival before the gloo rendezvous, so a rank that never
        # constructs its coordinator is named by the timeout.
        self._mark_entered()
        try:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = datetime.timedelta(seconds=self.timeout)
            options._devices = [_gloo_device(dist, info)]
            self._pg = dist.ProcessGroupGloo(
                dist.PrefixStore("gloo", self._store), info.rank, info.world_size, options)
        except Exception as exc:
            raise self._collective_error("coordinator start-up", exc, self.timeout) from exc

    @property
    def store(self):
        """The launch's rendezvous store (a torch ``Store``), for components that build
        their own process groups on it, such as the gloo Communicator. Use your own
        ``PrefixStore`` on it; never write outside your prefix."""
        self._check_usable()
        return self._root_store

    # -- gloo collectives ----------------------------------------------------
    def broadcast(self, data: bytes, src: int = 0, timeout: Optional[float] = None) -> bytes:
        self._check_usable()
        if not 0 <= src < self.world_size:
            raise CoordinatorError(f"broadcast src={src} is not a rank; expected 0 <= src < {self.world_size}")
        torch = self._torch
        payload = _as_bytes(data) if self.rank == src else b""
        length = torch.tensor([len(payload)], dtype=torch.int64)
        self._run("broadcast", timeout,
                  lambda t: self._pg.broadcast([length], _options("BroadcastOptions", t, rootRank=src)))
        n = int(length.item())
        if n == 0:
            return b""
        buf = _tensor_from(payload) if self.rank == src else torch.empty(n, dtype=torch.uint8)
        self._run("broadcast", timeout,
                  lambda t: self._pg.broadcast([buf], _options("BroadcastOptions", t, rootRank=src)))
        return payload if self.rank == src else _bytes_of(buf)

    def all_gather(self, data: bytes, timeout: Optional[float] = None) -> list[bytes]:
        self._check_usable()
        torch = self._torch
        payload = _as_bytes(data)
        mine = torch.tensor([len(payload)], dtype=torch.int64)
        lengths = [torch.empty(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._run("all_gather", timeout,
                  lambda t: self._pg.allgather([lengths], [mine], _options("AllgatherOptions", t)))
        sizes = [int(t.item()) for t in lengths]
        width = max(sizes)
        if width == 0:
            return [b""] * self.world_size
        padded = torch.zeros(width, dtype=torch.uint8)
        if payload:
            padded[: len(payload)] = _tensor_from(payload)
        out = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run("all_gather", timeout,
                  lambda t: self._pg.allgather([out], [padded], _options("AllgatherOptions", t)))
        return [_bytes_of(t)[:n] for t, n in zip(out, sizes)]

    # -- store barriers ------------------------------------------------------
    def barrier(self, timeout: Optional[float] = None) -> None:
        self._check_usable()
        self._store_barrier("world", list(range(self.world_size)), timeout)

    def local_barrier(self, timeout: Optional[float] = None) -> None:
        self._check_usable()
        self._store_barrier(f"node{self.node_rank}", None, timeout)

    def _store_barrier(self, scope: str, ranks: Optional[list[int]], timeout: Optional[float]) -> None:
        """Counter barrier on the store.

        Each participant adds 1 to ``scope/gen/count`` and writes its own
        arrival key; the one that brings the count to the group size writes
        ``done``, which the others wait on (a server-side wait, no polling).
        That last arriver also deletes the previous generation's keys: every
        participant has arrived here, so all of them have left it.
        """
        store = self._store
        size = self.world_size if ranks is not None else self.local_world_size
        gen = self._barriers.get(scope, 0)
        self._barriers[scope] = gen + 1
        key = f"barrier/{scope}/{gen}"
        store.set(f"{key}/rank{self.rank}", b"1")
        if store.add(f"{key}/count", 1) == size:
            store.set(f"{key}/done", b"1")
            if gen > 0:
                self._delete_generation(f"barrier/{scope}/{gen - 1}", scope, ranks)
            return
        seconds = self._timeout(timeout)
        try:
            store.wait([f"{key}/done"], datetime.timedelta(seconds=seconds))
        except Exception as exc:
            if not _is_timeout(exc):
                self._broken = f"the rendezvous store failed: {exc}"
                raise CoordinatorError(f"{scope} barrier failed on rank {self.rank}: {exc}. "
                                       f"{_store_lost_hint(self.info)}") from exc
            arrived = self._arrived(key, ranks)
            participants = ranks if ranks is not None else self._node_members()
            missing = [r for r in participants if r not in arrived]
            what = "barrier" if ranks is not None else f"local barrier of node {self.node_rank}"
            _report_stuck(what)
            raise DistribTimeoutError(
                f"{what} timed out after {seconds:g}s on rank {self.rank}: "
                f"{_describe_missing(missing, arrived, ranks)}", missing=missing,
            ) from None

    def _arrived(self, key: str, ranks: Optional[list[int]]) -> list[int]:
        candidates = ranks if ranks is not None else range(self.world_size)
        return [r for r in candidates if self._store.check([f"{key}/rank{r}"])]

    def _node_members(self) -> list[int]:
        """Global ranks on this node: each rank records its node at start-up."""
        store = self._store
        return [r for r in range(self.world_size)
                if store.check([f"node/{r}"]) and store.get(f"node/{r}") == str(self.node_rank).encode()]

    def _delete_generation(self, key: str, scope: str, ranks: Optional[list[int]]) -> None:
        store = self._store
        members = ranks if ranks is not None else self._node_members()
        for suffix in ["count", "done"] + [f"rank{r}" for r in members]:
            store.delete_key(f"{key}/{suffix}")

    # -- plumbing -------------------------------------------------------------
    def _mark_entered(self) -> None:
        self._store.set(f"node/{self.rank}", str(self.node_rank).encode())
        self._store.set(f"entered/{self.rank}", str(self._collectives).encode())

    def _run(self, what: str, timeout: Optional[float], op: Callable) -> None:
        self._collectives += 1
        self._store.set(f"entered/{self.rank}", str(self._collectives).encode())
        seconds = self._timeout(timeout)
        try:
            op(datetime.timedelta(seconds=seconds)).wait()
        except Exception as exc:
            raise self._collective_error(what, exc, seconds) from exc

    def _collective_error(self, what: str, exc: Exception, seconds: float) -> DistribError:
        """Turn a gloo failure into our error, naming the ranks that are behind."""
        self._broken = f"{what} failed: {exc}"
        try:
            entered = {r: int(self._store.get(f"entered/{r}"))
                       for r in range(self.world_size) if self._store.check([f"entered/{r}"])}
        except Exception:  # the store itself is gone (the master died)
            entered = {}
        behind = [r for r in range(self.world_size) if entered.get(r, -1) < self._collectives]
        if _is_timeout(exc):
            _report_stuck(what)
        if _is_timeout(exc) and behind:
            return DistribTimeoutError(
                f"{what} timed out after {seconds:g}s on rank {self.rank}: ranks {format_ranks(behind)} "
                "never arrived (they are still in earlier work, hung, or dead)", missing=behind)
        if _is_timeout(exc):
            return DistribTimeoutError(f"{what} timed out after {seconds:g}s on rank {self.rank}: {exc}")
        hint = f"; ranks {format_ranks(behind)} had not arrived" if behind else ""
        return CoordinatorError(
            f"{what} failed on rank {self.rank}: {_first_line(exc)}{hint}. A peer process probably "
            "exited or crashed; check its output.")

    def _timeout(self, timeout: Optional[float]) -> float:
        seconds = self.timeout if timeout is None else float(timeout)
        if seconds <= 0:
            raise CoordinatorError(f"timeout={timeout!r} must be > 0 seconds")
        return seconds

    def _check_usable(self) -> None:
        if self._closed:
            raise CoordinatorError("this coordinator is closed; call distrib.init() again for a new one")
        if self._broken:
            raise CoordinatorError(
                f"this coordinator is unusable after an earlier failure ({self._broken}); "
                "ranks may be out of step, so the launch should stop")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pg, self._pg = getattr(self, "_pg", None), None
        del pg  # gloo closes its sockets when the last reference goes
        self._store = self._root_store = None


def _store_lost_hint(info: LaunchInfo) -> str:
    """Who hosted the rendezvous store, so that losing it names who is gone."""
    from .._store import AGENT_STORE_VAR

    where = f"{info.master_addr}:{info.master_port}"
    if os.environ.get(AGENT_STORE_VAR) == "True":
        return (f"The rendezvous store at {where} is its launcher's (on node 0): that launcher "
                "has probably exited or been killed.")
    return (f"The rendezvous store at {where} is hosted by rank 0 (no launcher beside the ranks): "
            "rank 0 has probably exited or crashed; check its output.")


def _report_stuck(what: str) -> None:
    """Let the launcher see where every rank is before this timeout unwinds the stack."""
    from ..control import agent

    agent.report_stuck(what)


def _gloo_device(dist, info: LaunchInfo):
    """The gloo device: one that the other ranks can reach, on every host.

    ``GLOO_SOCKET_IFNAME`` (torch's variable) names the interface when set.
    Otherwise the device binds the local address that routes to
    MASTER_ADDR, which the other hosts can reach back; gloo's own default
    (the address the hostname resolves to) is the fallback when no route is
    found.
    """
    from .._network import local_address_towards

    interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if interface:
        return dist.ProcessGroupGloo.create_device(interface=interface)
    address = local_address_towards(info.master_addr, info.master_port)
    if address:
        return dist.ProcessGroupGloo.create_device(hostname=address)
    return dist.ProcessGroupGloo.create_default_device()


def _options(kind: str, timeout: datetime.timedelta, **fields):
    from torch._C import _distributed_c10d as c10d

    options = getattr(c10d, kind)()
    options.timeout = timeout
    for name, value in fields.items():
        setattr(options, name, value)
    return options


def _as_bytes(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise CoordinatorError(f"expected bytes, got {type(data).__name__}; encode it first (msgpack, json …)")


def _tensor_from(payload: bytes):
    import torch

    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _bytes_of(tensor) -> bytes:
    return ctypes.string_at(tensor.data_ptr(), tensor.numel())


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _describe_missing(missing: list[int], arrived: list[int], ranks: Optional[list[int]]) -> str:
    if missing:
        return f"ranks {format_ranks(missing)} never arrived (arrived: {format_ranks(arrived) or 'none'})"
    return f"arrived: {format_ranks(arrived) or 'none'}; the missing ranks never started their coordinator"
