"""The reference Coordinator: gloo through ``torch.distributed``.

It owns its own gloo process group, built directly on a prefixed view of the
rendezvous store, so it never initialises or changes the user's default
``torch.distributed`` group. Barriers run on the store itself (an arrival
counter per barrier and one key per rank), which is what lets a timeout name
the ranks that never arrived. Broadcast and all-gather run on gloo; before
each one a rank records how many collectives it has entered, so a gloo
timeout can name the ranks that are behind.

A group (:meth:`Coordinator.group`) is one more GlooCoordinator with its own
gloo process group, its own client of the store and its own prefix there
(named by the group's key), started by its members alone.
"""
from __future__ import annotations

import ctypes
import datetime
import os
from typing import Any, Callable, Optional

from ..errors import CoordinatorError, DistribError, DistribTimeoutError
from .._text import format_ranks, rank_list
from ..info import LaunchInfo
from .api import DEFAULT_TIMEOUT, Coordinator, GroupSpec, coordinators

__all__ = ["GlooCoordinator"]


@coordinators.register("gloo")
class GlooCoordinator(Coordinator):
    """Coordinator on a private gloo process group and the rendezvous store."""

    name = "gloo"

    def __init__(self, info: LaunchInfo, timeout: Optional[float] = None, store=None,
                 group: Optional[GroupSpec] = None):
        super().__init__(info, group)
        import torch
        import torch.distributed as dist

        from .._store import connect_store

        self._torch = torch
        self._dist = dist
        self.timeout = float(timeout if timeout is not None
                             else os.environ.get("DISTRIB_COORDINATOR_TIMEOUT", DEFAULT_TIMEOUT))
        self._closed = False
        self._broken: Optional[str] = None
        self._collectives = 0  # gloo collectives entered by this rank
        self._barriers: dict[str, int] = {}  # barrier scope -> generation
        self._nodes: Optional[list[int]] = None  # a group's launch node of each member
        self._abandoned: list = []  # timed-out point-to-point work gloo may still write into
        # A group has its own client: a store client serialises its calls, so a
        # barrier waiting in one group would hold up every other group's.
        self._root_store = store if store is not None else connect_store(
            info, self.timeout, client=group is not None)
        prefix = f"distrib/{info.launch_id}/coordinator"
        # Any: close() drops it, and torch's stub of Store.set takes str where bytes work too.
        self._store: Any = dist.PrefixStore(prefix if self.is_world else f"{prefix}/{self.spec.key}",
                                            self._root_store)
        self._of = "" if self.is_world else f" of {self.describe()}"

        # Record arrival before the gloo rendezvous, so a rank that never
        # constructs its coordinator is named by the timeout.
        self._mark_entered()
        what = "coordinator start-up" if self.is_world else f"start-up{self._of}"
        try:
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
            options._timeout = datetime.timedelta(seconds=self.timeout)
            options._devices = [_gloo_device(dist, info)]
            # Any: torch's stubs leave out ProcessGroupGloo's collectives and send/recv.
            self._pg: Any = dist.ProcessGroupGloo(
                dist.PrefixStore("gloo", self._store), self.rank, self.world_size, options)
        except Exception as exc:
            raise self._collective_error(what, exc, self.timeout) from exc
        if not self.is_world:
            self._agree_on_membership()

    def _agree_on_membership(self) -> None:
        """Where every member runs, and that they all named the group alike (one all-gather).

        Members with the same key have the same ranks (the key is made from them).
        """
        import json

        mine = {"name": self.spec.name, "node": self.info.node_rank}
        views = [json.loads(b) for b in self.all_gather(json.dumps(mine).encode())]
        if any(view["name"] != mine["name"] for view in views):
            raise CoordinatorError(
                f"the members of {self.describe()} named it differently: "
                + "; ".join(f"rank {self.ranks[r]}: {v['name']!r}" for r, v in enumerate(views))
                + ". Every member must create its groups alike.")
        self._nodes = [view["node"] for view in views]
        self._place(self._nodes)

    def _new_group(self, spec: GroupSpec, timeout: Optional[float]) -> "GlooCoordinator":
        self._check_usable()
        return GlooCoordinator(self.info, timeout=self.timeout if timeout is None else timeout, group=spec)

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
            raise CoordinatorError(f"broadcast src={src}{self._of} is not a rank; expected 0 <= src < "
                                   f"{self.world_size}")
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

    # -- point to point -------------------------------------------------------
    def send(self, data: bytes, dst: int, timeout: Optional[float] = None) -> None:
        self._check_usable()
        self._check_peer("send to", dst)
        payload = _as_bytes(data)
        length = self._torch.tensor([len(payload)], dtype=self._torch.int64)
        self._p2p("send", dst, length, timeout)
        if payload:
            self._p2p("send", dst, _tensor_from(payload), timeout)

    def recv(self, src: int, timeout: Optional[float] = None) -> bytes:
        self._check_usable()
        self._check_peer("recv from", src)
        torch = self._torch
        length = torch.empty(1, dtype=torch.int64)
        self._p2p("recv", src, length, timeout)
        n = int(length.item())
        if n == 0:
            return b""
        buf = torch.empty(n, dtype=torch.uint8)
        self._p2p("recv", src, buf, timeout)
        return _bytes_of(buf)

    def _check_peer(self, what: str, peer: int) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise CoordinatorError(f"{what} rank {peer!r}{self._of}: expected a rank in 0..{self.world_size - 1}")
        if peer == self.rank:
            raise CoordinatorError(f"{what} rank {peer}{self._of}: that is this rank itself")

    def _p2p(self, what: str, peer: int, tensor, timeout: Optional[float]) -> None:
        seconds = self._timeout(timeout)
        work = (self._pg.send if what == "send" else self._pg.recv)([tensor], peer, 0)
        try:
            work.wait(datetime.timedelta(seconds=seconds))
        except Exception as exc:
            # The transfer may still complete into this tensor: keep both alive.
            self._abandoned.append((work, tensor))
            peer_rank = self.ranks[peer]
            self._broken = f"{what} with rank {peer_rank} failed: {_first_line(exc)}"
            direction = "to" if what == "send" else "from"
            if _is_timeout(exc):
                _report_stuck(f"{what}{self._of}")
                raise DistribTimeoutError(
                    f"{what} {direction} rank {peer_rank}{self._of} timed out after {seconds:g}s on rank "
                    f"{self.global_rank}: rank {peer_rank} never made the matching "
                    f"{'recv' if what == 'send' else 'send'} (hung, dead, or busy elsewhere)",
                    missing=[peer_rank]) from None
            raise CoordinatorError(
                f"{what} {direction} rank {peer_rank}{self._of} failed on rank {self.global_rank}: "
                f"{_first_line(exc)}. The peer probably exited or crashed; check its output.") from exc

    # -- store barriers ------------------------------------------------------
    def barrier(self, timeout: Optional[float] = None) -> None:
        self._check_usable()
        self._store_barrier("world", list(range(self.world_size)), timeout)

    def local_barrier(self, timeout: Optional[float] = None) -> None:
        self._check_usable()
        self._store_barrier(f"node{self.info.node_rank}", None, timeout)

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
                raise CoordinatorError(f"{scope} barrier{self._of} failed on rank {self.global_rank}: {exc}. "
                                       f"{_store_lost_hint(self.info)}") from exc
            arrived = self.global_ranks(self._arrived(key, ranks))
            participants = self.global_ranks(ranks if ranks is not None else self._node_members())
            missing = [r for r in participants if r not in arrived]
            what = "barrier" if ranks is not None else f"local barrier of node {self.info.node_rank}"
            _report_stuck(what + self._of)
            raise DistribTimeoutError(
                f"{what}{self._of} timed out after {seconds:g}s on rank {self.global_rank}: "
                f"{_describe_missing(missing, arrived)}", missing=missing,
            ) from None

    def _arrived(self, key: str, ranks: Optional[list[int]]) -> list[int]:
        candidates = ranks if ranks is not None else range(self.world_size)
        return [r for r in candidates if self._store.check([f"{key}/rank{r}"])]

    def _node_members(self) -> list[int]:
        """The ranks (of this coordinator) on this node: a group knows where its members run; in
        the whole launch each rank records its node at start-up."""
        node = self.info.node_rank
        if self._nodes is not None:
            return [r for r, n in enumerate(self._nodes) if n == node]
        store = self._store
        return [r for r in range(self.world_size)
                if store.check([f"node/{r}"]) and store.get(f"node/{r}") == str(node).encode()]

    def _delete_generation(self, key: str, scope: str, ranks: Optional[list[int]]) -> None:
        store = self._store
        members = ranks if ranks is not None else self._node_members()
        for suffix in ["count", "done"] + [f"rank{r}" for r in members]:
            store.delete_key(f"{key}/{suffix}")

    # -- plumbing -------------------------------------------------------------
    def _mark_entered(self) -> None:
        self._store.set(f"node/{self.rank}", str(self.info.node_rank).encode())
        self._store.set(f"entered/{self.rank}", str(self._collectives).encode())

    def _run(self, what: str, timeout: Optional[float], op: Callable) -> None:
        self._collectives += 1
        self._store.set(f"entered/{self.rank}", str(self._collectives).encode())
        seconds = self._timeout(timeout)
        try:
            op(datetime.timedelta(seconds=seconds)).wait()
        except Exception as exc:
            raise self._collective_error(what + self._of, exc, seconds) from exc

    def _collective_error(self, what: str, exc: Exception, seconds: float) -> DistribError:
        """Turn a gloo failure into our error, naming the (global) ranks that are behind."""
        self._broken = f"{what} failed: {exc}"
        try:
            entered = {r: int(self._store.get(f"entered/{r}"))
                       for r in range(self.world_size) if self._store.check([f"entered/{r}"])}
        except Exception:  # the store itself is gone (the master died)
            entered = {}
        behind = self.global_ranks(r for r in range(self.world_size) if entered.get(r, -1) < self._collectives)
        where = f"on rank {self.global_rank}"
        if _is_timeout(exc):
            _report_stuck(what)
        if _is_timeout(exc) and behind:
            return DistribTimeoutError(
                f"{what} timed out after {seconds:g}s {where}: {rank_list(behind)} never arrived "
                "(still in earlier work, hung, or dead)", missing=behind)
        if _is_timeout(exc):
            return DistribTimeoutError(f"{what} timed out after {seconds:g}s {where}: {exc}")
        hint = f"; {rank_list(behind)} had not arrived" if behind else ""
        return CoordinatorError(
            f"{what} failed {where}: {_first_line(exc)}{hint}. A peer process probably "
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

    def _close(self) -> None:
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


def _describe_missing(missing: list[int], arrived: list[int]) -> str:
    if missing:
        return f"{rank_list(missing)} never arrived (arrived: {format_ranks(arrived) or 'none'})"
    return f"arrived: {format_ranks(arrived) or 'none'}; the missing ranks never started their coordinator"
