"""How the launchers of a multi-node launch (one per node) meet and watch each other.

Node 0's launcher hosts the launch's TCPStore; every node's launcher is a
client of it, under the prefix ``distrib/<launch_id>/nodes``:

- ``node/<k>``: node ``k`` has joined (its process count, host, and node 0's
  challenge; node 0's record also holds the endpoint of its node link);
- ``failure/<k>`` and the counter ``failed``: node ``k``'s root-cause
  failure, so every other node stops its workers and reports the same cause;
- ``lost/<k>``: node 0 lost node ``k`` (its link ended or went silent), and why;
- ``reports``, ``report/<n>`` and ``stacks/<n>/<k>``: the n-th request, from
  some node, for every node's stack snapshots (the asking node and why), and
  node ``k``'s answer, so that one node prints where every rank of the launch is;
- ``done/<k>``: node ``k`` has finished. Node 0 keeps the store up until
  every node is done, because the workers of slower nodes still use it.

The store has no authentication (it is torch's), so nothing secret is in it,
and every value a launcher writes there carries an HMAC of its key and bytes
under the launch secret, which every node derives on its own (see
:mod:`._secret`): a value that fails the check is ignored, and said once. A
stranger who can reach the port can neither stop the launch with a forged
failure record nor join as a node, and nodes that do not share the secret
learn so at the rendezvous: node 0's record, which every node must verify,
holds a fresh challenge that each node's own signed record repeats. The
counters (``failed``, ``reports``) cannot be signed; they only prompt reads of
signed records. Every wait is bounded, and a timeout names the missing nodes.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .._text import format_ranks, node_list
from ..errors import CoordinatorError, DistribTimeoutError, WorkerFailure

__all__ = ["NodePlan", "NodeRendezvous"]

logger = logging.getLogger("distrib.launcher")

_FAILURE_FIELDS = ("rank", "timestamp", "exitcode", "signal_name", "exc_type", "message",
                   "traceback", "host")
_SLICE = 1.0              # seconds per wait, so that a Ctrl-C is noticed
_POLL = 0.05              # seconds between looks for the nodes' signed records


@dataclass(frozen=True)
class NodePlan:
    """What every node knows once all have joined."""

    world_size: int
    rank_offset: int          # global rank of this node's local rank 0
    nprocs_per_node: tuple[int, ...]
    hosts: tuple[str, ...]
    link: str                 # node 0's node-link endpoint (host:port)

    def describe_node(self, node: int) -> str:
        """'node 1 (host b, ranks 2-3)'."""
        first = sum(self.nprocs_per_node[:node])
        ranks = range(first, first + self.nprocs_per_node[node])
        return f"node {node} ({self.hosts[node]}, rank{'s' if len(ranks) != 1 else ''} {format_ranks(ranks)})"


class NodeRendezvous:
    """One node's side of the node-level rendezvous (see the module docstring).

    ``secret`` signs and checks every value; ``where`` says where it came from,
    for the message when nodes turn out not to share it; ``note`` reports a
    value that failed the check (once per key).
    """

    def __init__(self, store, launch_id: str, nnodes: int, node_rank: int, secret: str,
                 where: str = "DISTRIB_SECRET", note: Optional[Callable[[str], None]] = None):
        from torch.distributed import PrefixStore

        self._prefix = f"distrib/{launch_id}/nodes"
        self._store = PrefixStore(self._prefix, store)
        self.nnodes = nnodes
        self.node_rank = node_rank
        self._key = secret.encode()
        self._where = where
        self._note = note or logger.warning
        self._rejected: set[str] = set()  # keys whose value failed the check (said once)
        self._reports_seen = 0  # report requests already handled (or made) by this node
        self.plan: Optional[NodePlan] = None

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

    # -- signed values -------------------------------------------------------------
    def _mac(self, key: str, payload: bytes) -> bytes:
        return hmac.new(self._key, f"{self._prefix}/{key}".encode() + b"\0" + payload, hashlib.sha256).hexdigest().encode()

    def _put(self, key: str, record: Any) -> None:
        payload = json.dumps(record).encode()
        self._store.set(key, self._mac(key, payload) + b":" + payload)  # type: ignore[arg-type]  # bytes are stored as they are

    def _get(self, key: str) -> Any:
        """The record under ``key`` if one is there and carries this launch's signature, else None."""
        if not self._store.check([key]):
            return None
        raw = self._store.get(key)
        mac, sep, payload = raw.partition(b":")
        if sep and hmac.compare_digest(mac, self._mac(key, payload)):
            try:
                return json.loads(payload)
            except ValueError:
                pass
        if key not in self._rejected:
            self._rejected.add(key)
            self._note(f"ignored the value under {self._prefix}/{key} in the rendezvous store: it does not "
                       "carry this launch's signature (it was written without the launch secret)")
        return None

    # -- joining ----------------------------------------------------------------------
    def join(self, nprocs: int, timeout: float, link: str = "",
             should_stop: Callable[[], None] = lambda: None) -> NodePlan:
        """Announce this node and wait (at most ``timeout`` s) for all the others.

        Node 0 makes the challenge (and passes its node link's endpoint,
        ``link``); every other node first needs node 0's record, signed.
        ``should_stop`` is called between short waits and may raise to abandon the wait.
        """
        host = socket.gethostname()
        deadline = time.monotonic() + timeout
        if self.node_rank == 0:
            challenge = secrets.token_hex(16)
            self._put("node/0", {"nprocs": nprocs, "host": host, "challenge": challenge, "link": link})
        else:
            # A first record without the answer: it lets node 0 tell a node that
            # signs with another secret from one that never came.
            self._put(f"node/{self.node_rank}", {"nprocs": nprocs, "host": host, "challenge": ""})
            first = self._wait_for([0], deadline, should_stop)[0]
            challenge = first["challenge"]
            self._put(f"node/{self.node_rank}", {"nprocs": nprocs, "host": host, "challenge": challenge})
        records = self._wait_for(list(range(self.nnodes)), deadline, should_stop, challenge)
        sizes = tuple(int(r["nprocs"]) for r in records)
        self.plan = NodePlan(world_size=sum(sizes), rank_offset=sum(sizes[: self.node_rank]),
                             nprocs_per_node=sizes, hosts=tuple(str(r["host"]) for r in records),
                             link=str(records[0].get("link", "")))
        return self.plan

    def _wait_for(self, nodes: list[int], deadline: float, should_stop: Callable[[], None],
                  challenge: Optional[str] = None) -> list[dict]:
        """Every node's signed record (answering ``challenge``), or a timeout naming the missing ones."""
        found: dict[int, dict] = {}
        while True:
            should_stop()
            if not self._read_records(nodes, found, challenge):
                break  # node 0 gave up on a node it could not verify: say why below
            if len(found) == len(nodes):
                return [found[k] for k in nodes]
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        missing = [k for k in nodes if k not in found]
        unsigned = [k for k in missing if f"node/{k}" in self._rejected]
        hint = ""
        if unsigned:
            hint = (f" The record of {node_list(unsigned)} did not carry this node's signature: if it was "
                    f"written by that node, the nodes do not share a secret (this node's comes from "
                    f"{self._where}). Set the same DISTRIB_SECRET on every node, or let every node read "
                    "the same key file (~/.config/distrib/key on a shared home, or DISTRIB_KEY_FILE).")
        joined = [k for k in nodes if k in found]
        raise DistribTimeoutError(
            f"node {self.node_rank} waited for {self.nnodes} nodes; {node_list(missing)} never joined "
            f"(joined: {format_ranks(joined) or 'none'}). Start distrib-run on the missing nodes with the "
            f"same --nnodes, --master-addr and --master-port, or raise --rdzv-timeout.{hint}",
            missing=missing) from None

    def _read_records(self, nodes: list[int], found: dict[int, dict], challenge: Optional[str]) -> bool:
        """Add the signed records (answering ``challenge``) now in the store to ``found``.

        False if the store failed after a record could not be verified (node 0
        has given up on that node, and the missing secret is the news).
        """
        for k in nodes:
            if k in found:
                continue
            try:
                record = self._get(f"node/{k}")
            except Exception as exc:  # noqa: BLE001 — the store itself failed
                if any(f"node/{j}" in self._rejected for j in nodes):
                    return False
                raise CoordinatorError(f"node {self.node_rank}: the rendezvous store failed while "
                                       f"nodes were joining: {exc}") from exc
            if isinstance(record, dict) and (challenge is None or record.get("challenge") == challenge):
                found[k] = record
        return True

    # -- while the workers run ---------------------------------------------------
    def report_failure(self, failure: WorkerFailure) -> None:
        """Publish this node's root-cause failure for the other nodes."""
        self._put(f"failure/{self.node_rank}", {name: getattr(failure, name) for name in _FAILURE_FIELDS})
        self._store.add("failed", 1)

    def remote_failures(self) -> list[WorkerFailure]:
        """The root-cause failures other nodes have published (signed)."""
        if self._store.add("failed", 0) == 0:
            return []
        found = []
        for k in range(self.nnodes):
            if k != self.node_rank:
                record = self._get(f"failure/{k}")
                if isinstance(record, dict):
                    fields: dict[str, Any] = {n: record.get(n) for n in _FAILURE_FIELDS}
                    found.append(WorkerFailure(**fields))
        return found

    def report_lost(self, node: int, why: str) -> None:
        """Node 0 publishes a node it lost, for the other nodes."""
        self._put(f"lost/{node}", {"why": why})

    def lost_nodes(self) -> dict[int, str]:
        """Nodes node 0 has published as lost: node -> why."""
        found = {}
        for k in range(1, self.nnodes):
            if k != self.node_rank:
                record = self._get(f"lost/{k}")
                if isinstance(record, dict):
                    found[k] = str(record.get("why", ""))
        return found

    def request_reports(self, reason: str) -> int:
        """Ask every other node for its ranks' stacks; returns the request's number."""
        number = self._store.add("reports", 1)
        self._put(f"report/{number}", {"node": self.node_rank, "reason": reason})
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
                record = self._get(key)
            except Exception:  # a request whose record never came: nothing to answer
                continue
            if isinstance(record, dict) and record.get("node") != self.node_rank:
                found.append((self._reports_seen, int(record.get("node", -1)), str(record.get("reason", ""))))
        return found

    def post_stacks(self, number: int, payload: bytes) -> None:
        """This node's answer to request ``number``."""
        self._put(f"stacks/{number}/{self.node_rank}", payload.hex())

    def stacks_for(self, number: int) -> dict[int, bytes]:
        """The other nodes' answers to request ``number`` so far (no waiting)."""
        found = {}
        for k in range(self.nnodes):
            if k != self.node_rank:
                answer = self._get(f"stacks/{number}/{k}")
                if isinstance(answer, str):
                    found[k] = bytes.fromhex(answer)
        return found

    def finished_nodes(self) -> list[int]:
        """Nodes that have finished (they answer no more requests)."""
        return [k for k in range(self.nnodes) if self._get(f"done/{k}") is not None]

    def finish(self) -> None:
        """Mark this node done (its workers have ended, well or not)."""
        self._put(f"done/{self.node_rank}", 1)

    def pending_nodes(self) -> list[int]:
        """Nodes that joined and have not finished yet."""
        return [k for k in range(self.nnodes)
                if self._get(f"node/{k}") is not None and self._get(f"done/{k}") is None]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
