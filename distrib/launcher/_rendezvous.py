"""How the launchers of a multi-node launch (one per node) meet and watch each other.

Node 0's launcher hosts the launch's TCPStore; every node's launcher is a
client of it, under the prefix ``distrib/<launch_id>/nodes``:

- ``node/<k>``: node ``k`` has joined (JSON: its process count and host);
- ``secret``: the launch's secret, written by node 0 before anything else;
- ``failure/<k>`` and the counter ``failed``: node ``k``'s root-cause
  failure, so every other node stops its workers and reports the same cause;
- ``beat/<k>``: a counter node ``k`` advances while it lives, so node 0 can
  tell a node that is still working from one whose launcher was killed;
- ``reports``, ``report/<n>`` and ``stacks/<n>/<k>``: the n-th request, from
  some node, for every node's stack snapshots (JSON: the asking node and
  why), and node ``k``'s answer (msgpack), so that one node prints where
  every rank of the launch is;
- ``done/<k>``: node ``k`` has finished. Node 0 keeps the store up until
  every node is done, because the workers of slower nodes still use it.

Every wait is bounded, and a timeout names the nodes that were missing.
"""
from __future__ import annotations

import datetime
import json
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .._text import format_ranks, node_list
from ..errors import CoordinatorError, DistribTimeoutError, WorkerFailure

__all__ = ["NodePlan", "NodeRendezvous"]

HEARTBEAT_INTERVAL = 1.0  # seconds between beats
HEARTBEAT_TIMEOUT = 30.0  # a node whose beats stop for this long is lost
_FAILURE_FIELDS = ("rank", "timestamp", "exitcode", "signal_name", "exc_type", "message",
                   "traceback", "host")
_SLICE = 1.0              # seconds per wait, so that a Ctrl-C is noticed


@dataclass(frozen=True)
class NodePlan:
    """What every node knows once all have joined."""

    world_size: int
    rank_offset: int          # global rank of this node's local rank 0
    nprocs_per_node: tuple[int, ...]
    hosts: tuple[str, ...]
    secret: str


class NodeRendezvous:
    """One node's side of the node-level rendezvous (see the module docstring)."""

    def __init__(self, store, launch_id: str, nnodes: int, node_rank: int):
        from torch.distributed import PrefixStore

        self._store = PrefixStore(f"distrib/{launch_id}/nodes", store)
        self.nnodes = nnodes
        self.node_rank = node_rank
        self._next_beat = 0.0
        self._beats: dict[int, tuple[int, float]] = {}  # node -> (last count, when it changed)
        self._reports_seen = 0  # report requests already handled (or made) by this node

    @staticmethod
    def connect(master_addr: str, port: int, node_rank: Optional[int], timeout: float,
                should_stop: Callable[[], None] = lambda: None):
        """A client of node 0's store; a timeout names node 0 as the missing node.

        ``node_rank`` is for the message (None: this node has no number yet).

        Tries in short slices, calling ``should_stop`` between them (it may
        raise to abandon the wait, e.g. on Ctrl-C).
        """
        from torch.distributed import TCPStore

        deadline = time.monotonic() + timeout
        while True:
            should_stop()
            left = deadline - time.monotonic()
            try:
                return TCPStore(master_addr, port, None, is_master=False, wait_for_workers=False,
                                timeout=datetime.timedelta(seconds=max(0.1, min(_SLICE, left))))
            except Exception as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                who = "this node" if node_rank is None else f"node {node_rank}"
                raise DistribTimeoutError(
                    f"{who} could not reach node 0's rendezvous store at {master_addr}:{port} within "
                    f"{timeout:g}s (missing: node 0). Start node 0 (the node whose address that is) "
                    "with the same --master-addr/--master-port (or --rdzv-endpoint), check that the "
                    f"address is reachable from this host, or raise --rdzv-timeout. ({_first_line(exc)})",
                    missing=[0]) from exc

    @staticmethod
    def take_node_rank(store, launch_id: str, nnodes: int) -> int:
        """The next node number (1, 2, ...) for a node that joins without one; node 0 hosts the store."""
        rank = int(store.add(f"distrib/{launch_id}/node-ranks", 1))
        if rank >= nnodes:
            raise CoordinatorError(
                f"more than --nnodes {nnodes} nodes joined the launch at the same rendezvous "
                f"({rank + 1} so far); start exactly {nnodes}, or give each its --node-rank")
        return rank

    def join(self, nprocs: int, secret: str, timeout: float,
             should_stop: Callable[[], None] = lambda: None) -> NodePlan:
        """Announce this node and wait (at most ``timeout`` s) for all the others.

        ``should_stop`` is called between short waits and may raise to abandon the wait.
        """
        store = self._store
        if self.node_rank == 0:
            store.set("secret", secret)
        store.set(f"node/{self.node_rank}", json.dumps(
            {"nprocs": nprocs, "host": socket.gethostname()}))
        keys = [f"node/{k}" for k in range(self.nnodes)]
        deadline = time.monotonic() + timeout
        while True:
            should_stop()
            left = deadline - time.monotonic()
            try:
                store.wait(keys + ["secret"], datetime.timedelta(seconds=max(0.01, min(_SLICE, left))))
                break
            except Exception as exc:
                if not _is_timeout(exc):
                    raise CoordinatorError(f"node {self.node_rank}: the rendezvous store failed "
                                           f"while nodes were joining: {exc}") from exc
                if time.monotonic() < deadline:
                    continue
                missing = [k for k in range(self.nnodes) if not store.check([f"node/{k}"])]
                joined = [k for k in range(self.nnodes) if k not in missing]
                raise DistribTimeoutError(
                    f"node {self.node_rank} waited {timeout:g}s for {self.nnodes} nodes; "
                    f"{node_list(missing)} never joined (joined: {format_ranks(joined)}). "
                    "Start distrib-run on the missing nodes with the same --nnodes, --master-addr "
                    "and --master-port, or raise --rdzv-timeout.", missing=missing) from None
        records = [json.loads(store.get(k)) for k in keys]
        sizes = tuple(int(r["nprocs"]) for r in records)
        return NodePlan(world_size=sum(sizes), rank_offset=sum(sizes[: self.node_rank]),
                        nprocs_per_node=sizes, hosts=tuple(str(r["host"]) for r in records),
                        secret=store.get("secret").decode())

    # -- while the workers run ---------------------------------------------------
    def beat(self) -> None:
        """Advance this node's heartbeat (at most once per HEARTBEAT_INTERVAL)."""
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_INTERVAL
            self._store.add(f"beat/{self.node_rank}", 1)

    def report_failure(self, failure: WorkerFailure) -> None:
        """Publish this node's root-cause failure for the other nodes."""
        record = {name: getattr(failure, name) for name in _FAILURE_FIELDS}
        self._store.set(f"failure/{self.node_rank}", json.dumps(record))
        self._store.add("failed", 1)

    def remote_failures(self) -> list[WorkerFailure]:
        """The root-cause failures other nodes have published."""
        if self._store.add("failed", 0) == 0:
            return []
        found = []
        for k in range(self.nnodes):
            if k != self.node_rank and self._store.check([f"failure/{k}"]):
                record = json.loads(self._store.get(f"failure/{k}"))
                found.append(WorkerFailure(**{n: record.get(n) for n in _FAILURE_FIELDS}))
        return found

    def request_reports(self, reason: str) -> int:
        """Ask every other node for its ranks' stacks; returns the request's number."""
        number = self._store.add("reports", 1)
        self._store.set(f"report/{number}", json.dumps({"node": self.node_rank, "reason": reason}))
        return number

    def report_requests(self) -> list[tuple[int, int, str]]:
        """Requests from other nodes not handled yet: (number, asking node, reason)."""
        count = self._store.add("reports", 0)
        found = []
        while self._reports_seen < count:
            self._reports_seen += 1
            key = f"report/{self._reports_seen}"
            try:
                self._store.wait([key], datetime.timedelta(seconds=5))
                record = json.loads(self._store.get(key))
            except Exception:  # a request whose record never came: nothing to answer
                continue
            if record.get("node") != self.node_rank:
                found.append((self._reports_seen, int(record.get("node", -1)), str(record.get("reason", ""))))
        return found

    def post_stacks(self, number: int, payload: bytes) -> None:
        """This node's answer to request ``number``."""
        self._store.set(f"stacks/{number}/{self.node_rank}", payload)  # type: ignore[arg-type]  # torch's stub says str; bytes are what it stores

    def stacks_for(self, number: int) -> dict[int, bytes]:
        """The other nodes' answers to request ``number`` so far (no waiting)."""
        found = {}
        for k in range(self.nnodes):
            key = f"stacks/{number}/{k}"
            if k != self.node_rank and self._store.check([key]):
                found[k] = self._store.get(key)
        return found

    def finished_nodes(self) -> list[int]:
        """Nodes that have finished (they answer no more requests)."""
        return [k for k in range(self.nnodes) if self._store.check([f"done/{k}"])]

    def lost_nodes(self) -> list[int]:
        """Nodes not done whose heartbeat has not moved for HEARTBEAT_TIMEOUT seconds."""
        now = time.monotonic()
        lost = []
        for k in range(self.nnodes):
            if k == self.node_rank or self._store.check([f"done/{k}"]):
                continue
            count = self._store.add(f"beat/{k}", 0)
            last, since = self._beats.get(k, (-1, now))
            if count != last:
                self._beats[k] = (count, now)
            elif now - since > HEARTBEAT_TIMEOUT:
                lost.append(k)
        return lost

    def finish(self) -> None:
        """Mark this node done (its workers have ended, well or not)."""
        self._store.set(f"done/{self.node_rank}", "1")

    def pending_nodes(self) -> list[int]:
        """Nodes that joined and have not finished yet."""
        return [k for k in range(self.nnodes)
                if self._store.check([f"node/{k}"]) and not self._store.check([f"done/{k}"])]


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
