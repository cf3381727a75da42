"""The launcher side of the control plane: who is alive, and where each rank is.

A launcher makes one :class:`Monitor` per node, passes :meth:`Monitor.worker_env`
to each worker (whose agent, :mod:`distrib.control.agent`, connects back),
and calls :meth:`Monitor.poll` from its supervision loop. The monitor then
knows each rank's host, pid and last heartbeat, and can take a
:meth:`snapshot` of every rank's stacks: first by asking the agents, then, for
a rank that does not answer (a C call holding its GIL), through
``faulthandler`` on :data:`~distrib.control.stacks.DUMP_SIGNAL`.

The socket is a CURVE server (see :mod:`._security`) on the loopback
address: only this node's workers, holding the launch's secret, can connect.
Every frame is decoded by :func:`codec.decode` and checked field by field; a
malformed one is logged and dropped.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from . import codec
from .agent import MONITOR_VAR, STACK_FILE_VAR
from .stacks import DUMP_SIGNAL, Snapshot, parse_faulthandler

__all__ = ["Monitor"]

logger = logging.getLogger("distrib.control")

MAX_MESSAGE = 16 << 20   # a stack snapshot of a process with many threads
_FAULTHANDLER_WAIT = 1.5  # seconds to wait for faulthandler's file to be written


@dataclass
class _Rank:
    rank: int
    pid: Optional[int] = None
    stack_file: Optional[str] = None
    identity: Optional[bytes] = None   # the agent's connection, once it said hello
    dumps: bool = False                # its hello said DUMP_SIGNAL dumps its stacks
    host: str = ""
    last_beat: Optional[float] = None  # time.monotonic() of the last message from it
    silent_reported: bool = False


class Monitor:
    """Heartbeats and stack snapshots of one node's workers."""

    def __init__(self, secret: str, heartbeat_timeout: float = 5.0):
        import zmq

        from ._security import SecureServer

        self._zmq = zmq
        self.heartbeat_timeout = heartbeat_timeout
        self._server = SecureServer(secret)
        self._sock, self.endpoint = self._server.socket(zmq.ROUTER, "127.0.0.1",
                                                        max_message=MAX_MESSAGE)
        self._ranks: dict[int, _Rank] = {}
        self._by_identity: dict[bytes, int] = {}
        self._stuck: list[tuple[bytes, int, int, str]] = []   # identity, request id, rank, what
        self._replies: dict[int, dict[int, Snapshot]] = {}
        self._next_request = 0
        self.received = 0  # messages that reached this monitor (for tests and diagnostics)
        self.dropped = 0   # of those, malformed ones

    # -- set-up ----------------------------------------------------------------------
    def worker_env(self, stack_file: str) -> dict[str, str]:
        """Variables a worker needs to reach this monitor."""
        return {MONITOR_VAR: self.endpoint, STACK_FILE_VAR: stack_file}

    def watch(self, rank: int, pid: int, stack_file: Optional[str]) -> None:
        """A worker was started: its pid and stack file (for snapshots without its agent)."""
        entry = self._ranks.setdefault(rank, _Rank(rank))
        entry.pid, entry.stack_file = pid, stack_file

    def host_of(self, rank: int) -> str:
        entry = self._ranks.get(rank)
        return entry.host if entry else ""

    # -- receiving -------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> None:
        """Handle every message that has arrived (waiting up to ``timeout`` for the first)."""
        zmq = self._zmq
        wait_ms = int(timeout * 1000)
        while self._sock.poll(wait_ms):
            wait_ms = 0
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list) -> None:
        self.received += 1
        if len(frames) != 2:
            return self._drop(f"a message of {len(frames)} frames")
        identity, data = frames
        try:
            message = codec.decode(data, MAX_MESSAGE)
        except codec.MessageError as exc:
            return self._drop(str(exc))
        if not isinstance(message, dict) or not isinstance(message.get("t"), str):
            return self._drop("a message that is not a typed map")
        kind = message["t"]
        rank = message.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool):
            return self._drop(f"a {kind!r} message without an integer rank")
        if kind == "hello":
            return self._hello(identity, rank, message)
        if self._by_identity.get(identity) != rank:
            return self._drop(f"a {kind!r} message for rank {rank} from a connection that did not "
                              "say hello as that rank")
        entry = self._ranks[rank]
        entry.last_beat = time.monotonic()
        entry.silent_reported = False
        if kind == "beat":
            return
        if kind == "stuck":
            what, request = message.get("what"), message.get("id")
            if not isinstance(what, str) or not isinstance(request, int):
                return self._drop("a malformed 'stuck' message")
            self._stuck.append((identity, request, rank, what))
            return
        if kind == "stacks":
            request = message.get("id")
            try:
                snap = Snapshot.from_message(message)
            except ValueError as exc:
                return self._drop(str(exc))
            if snap.rank != rank or not isinstance(request, int):
                return self._drop("a stack snapshot for another rank")
            if request in self._replies:
                self._replies[request][rank] = snap
            return
        self._drop(f"a message of unknown type {kind!r}")

    def _hello(self, identity: bytes, rank: int, message: dict) -> None:
        host, pid = message.get("host"), message.get("pid")
        if not isinstance(host, str) or not isinstance(pid, int):
            return self._drop("a malformed hello")
        entry = self._ranks.get(rank)
        if entry is None:
            return self._drop(f"a hello from rank {rank}, which is not a worker of this node")
        if entry.pid is not None and entry.pid != pid:
            return self._drop(f"a hello as rank {rank} from pid {pid}, but rank {rank} is pid {entry.pid}")
        if entry.identity is not None:
            self._by_identity.pop(entry.identity, None)
        entry.identity, entry.host, entry.pid = identity, host, pid
        entry.dumps = message.get("dumps") is True
        entry.last_beat, entry.silent_reported = time.monotonic(), False
        self._by_identity[identity] = rank
        self._send(identity, {"t": "welcome"})

    def _drop(self, what: str) -> None:
        self.dropped += 1
        logger.warning("control monitor: dropped %s", what)

    def _send(self, identity: bytes, message: dict) -> None:
        try:
            self._sock.send_multipart([identity, codec.encode(message)], self._zmq.NOBLOCK)
        except self._zmq.ZMQError:
            pass  # that worker is gone

    # -- what the launcher asks ------------------------------------------------------
    def stuck(self) -> list[tuple[int, str]]:
        """Ranks whose coordinator timed out and asked for a snapshot: (rank, what)."""
        return [(rank, what) for _, _, rank, what in self._stuck]

    def release_stuck(self) -> None:
        """Tell the ranks that reported a timeout that the snapshot is taken."""
        for identity, request, _, _ in self._stuck:
            self._send(identity, {"t": "dumped", "id": request})
        self._stuck = []

    def silent(self, running: set[int]) -> list[tuple[int, str, float]]:
        """Running ranks newly silent for over ``heartbeat_timeout``: (rank, host, seconds)."""
        now = time.monotonic()
        found = []
        for entry in self._ranks.values():
            if (entry.rank in running and entry.last_beat is not None and not entry.silent_reported
                    and now - entry.last_beat > self.heartbeat_timeout):
                entry.silent_reported = True
                found.append((entry.rank, entry.host, now - entry.last_beat))
        return found

    def snapshot(self, ranks: Optional[list[int]] = None, timeout: float = 2.0) -> dict[int, Optional[Snapshot]]:
        """Every listed rank's stacks (None where neither its agent nor faulthandler answered)."""
        wanted = sorted(self._ranks if ranks is None else ranks)
        self._next_request += 1
        request = self._next_request
        self._replies[request] = {}
        for rank in wanted:
            entry = self._ranks.get(rank)
            if entry is not None and entry.identity is not None:
                self._send(entry.identity, {"t": "dump", "id": request})
        deadline = time.monotonic() + timeout
        replies = self._replies[request]
        while time.monotonic() < deadline and not all(r in replies for r in wanted):
            self.poll(min(0.05, max(0.0, deadline - time.monotonic())))
        self._replies.pop(request, None)
        result: dict[int, Optional[Snapshot]] = {r: replies.get(r) for r in wanted}
        missing = [r for r in wanted if result[r] is None]
        if missing:
            result.update(self._faulthandler(missing))
        return result

    def _faulthandler(self, ranks: list[int]) -> dict[int, Optional[Snapshot]]:
        """Snapshots of ranks whose agent did not answer, through faulthandler."""
        signalled: dict[int, tuple[str, int]] = {}  # rank -> its stack file, its size before
        for rank in ranks:
            entry = self._ranks.get(rank)
            # Only a rank whose hello said it registered the signal gets it: to any
            # other process it would be fatal. (A hello always sets the pid.)
            if entry is None or entry.identity is None or not entry.dumps or not entry.stack_file \
                    or entry.pid is None or DUMP_SIGNAL is None:
                continue
            try:
                offset = os.path.getsize(entry.stack_file)
                os.kill(entry.pid, DUMP_SIGNAL)
            except OSError:
                continue
            signalled[rank] = (entry.stack_file, offset)
        found: dict[int, Optional[Snapshot]] = {r: None for r in ranks}
        deadline = time.monotonic() + _FAULTHANDLER_WAIT
        sizes: dict[int, int] = {}
        while signalled and time.monotonic() < deadline:
            time.sleep(0.05)
            for rank, (path, offset) in list(signalled.items()):
                entry = self._ranks[rank]
                try:
                    size = os.path.getsize(path)
                except OSError:
                    signalled.pop(rank)
                    continue
                if size > offset and sizes.get(rank) == size:  # written, and no longer growing
                    found[rank] = self._read_dump(entry, path, offset)
                    signalled.pop(rank)
                sizes[rank] = size
        return found

    @staticmethod
    def _read_dump(entry: _Rank, path: str, offset: int) -> Optional[Snapshot]:
        try:
            with open(path, errors="replace") as f:
                head = f.readline()      # the agent's note of its main thread
                f.seek(offset)
                text = f.read()
        except OSError:
            return None
        return parse_faulthandler(head + text, entry.rank, entry.host, entry.pid or 0)

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
