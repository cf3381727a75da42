"""The broadcast channel across nodes: one CURVE-authenticated XPUB, one SUB per remote reader.

Every message is two frames, ``[header, payload]``: the header is the
message's sequence number and its kind (a message, or "the writer closed"),
so a reader that misses one notices the gap and raises instead of losing it
silently. The writer's XPUB has ``XPUB_NODROP``: a reader that falls a
high-water mark behind makes ``send`` wait (back-pressure, bounded by the
deadline) instead of dropping its messages.

Creation waits until the XPUB has seen each remote reader's subscription
(every reader also subscribes to a topic naming its rank, which is how they
are counted), so no message is lost to the slow-joiner problem. Frames that
do not parse are logged and dropped; sockets refuse frames over their
``max_message`` (libzmq drops such a connection before our code sees it).

Processes that die are noticed through their connection, which the kernel
closes: a reader whose connection ends without its "closing" subscription
(sent by :meth:`Subscriber.close`) makes the writer's next send raise, naming
it; a writer whose connection ends without its CLOSED message makes the
reader raise once it has read every whole message that arrived. zmq delivers
a message whole or not at all, so the one a writer was sending when it died
is never seen, in part or at all.
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Optional, Sequence

from .._text import rank_list
from ..errors import CoordinatorError, DistribTimeoutError
from ._security import SecureServer, client_socket
from ._waiting import Backoff

__all__ = ["Publisher", "Subscriber"]

logger = logging.getLogger("distrib.control")

_HEADER = struct.Struct("<QB")  # sequence, kind
MESSAGE, CLOSED = 0, 1
_IDENTITY = b"\xffdistrib-channel-reader:"  # + the reader's rank, as a subscription topic
_CLOSING = b"\xffdistrib-channel-closing:"  # + the reader's rank: it is closing, not dying
_CLOSING_LINGER_MS = 1000  # the most a reader's close waits for that notice to leave
_DRAIN_MS = 50  # after the writer's connection ended, how long a reader looks for what it sent
# The largest frame the XPUB accepts from a reader. libzmq applies it to the CURVE
# handshake's commands too (INITIATE is ~300 bytes with its metadata), so not less.
SUBSCRIPTION_LIMIT = 1024


class Publisher:
    """The writer's end: an XPUB bound to ``host`` on a random port, readable as :attr:`endpoint`."""

    def __init__(self, secret: str, host: str, remote_ranks: Sequence[int], *, hwm: int):
        import zmq

        self._zmq = zmq
        self.remote_ranks = list(remote_ranks)
        self._server = SecureServer(secret)
        try:
            self._socket, self.endpoint = self._server.socket(zmq.XPUB, host,
                                                              max_message=SUBSCRIPTION_LIMIT)
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._socket.setsockopt(zmq.SNDHWM, hwm)
        except BaseException:
            self._server.close()
            raise
        self._subscribed: set[int] = set()
        self._closing: set[int] = set()  # readers that said they close
        self._lost: set[int] = set()     # readers whose connection ended without that
        self._closed = False

    def wait_subscribed(self, deadline: float) -> None:
        """Block until every remote reader's subscription has arrived; raise naming those missing."""
        zmq = self._zmq
        wanted = set(self.remote_ranks)
        while not wanted <= self._subscribed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(wanted - self._subscribed)
                raise DistribTimeoutError(
                    f"broadcast channel: remote reader {rank_list(missing)} did not subscribe "
                    f"to the writer's endpoint {self.endpoint} before the timeout; check that their "
                    "nodes can reach this address (or set DISTRIB_BIND_ADDR)", missing=missing)
            if self._socket.poll(int(min(remaining, 1.0) * 1000) + 1, zmq.POLLIN):
                self._take_subscriptions()

    def _take_subscriptions(self) -> None:
        """Read the (un)subscriptions the readers' ends sent, or libzmq made for a lost connection."""
        zmq = self._zmq
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frame = self._socket.recv(zmq.NOBLOCK)
            subscribe, topic = frame[:1] == b"\x01", frame[1:]
            for prefix, found in ((_IDENTITY, self._subscribed), (_CLOSING, self._closing)):
                if not topic.startswith(prefix):
                    continue
                try:
                    rank = int(topic[len(prefix):])
                except ValueError:
                    logger.warning("broadcast channel: ignored a malformed subscription frame")
                    break
                if subscribe:
                    found.add(rank)
                elif prefix is _IDENTITY and rank not in self._closing:
                    self._lost.add(rank)  # its connection ended, and it never said it closes
                break

    def _check_readers(self) -> None:
        self._take_subscriptions()
        if self._lost:
            lost = sorted(self._lost)
            raise CoordinatorError(
                f"broadcast channel: the connections of remote reader {rank_list(lost)} "
                "ended without their closing the channel: they exited (or their network failed), "
                "and get nothing more. Close the channel; the launcher reports why they stopped")

    def send(self, seq: int, payload, deadline: float, kind: int = MESSAGE) -> None:
        """Queue message ``seq``; waits while a reader is a high-water mark behind, until ``deadline``.

        Raises CoordinatorError naming the readers whose connection ended
        without their closing (they died).
        """
        zmq = self._zmq
        frames = [_HEADER.pack(seq, kind), payload]
        backoff = None
        if kind == MESSAGE:
            self._check_readers()
        while True:
            try:
                # A multipart send is atomic: if the first frame is refused
                # (EAGAIN), nothing of the message was queued.
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                now = time.monotonic()
                if now >= deadline:
                    raise DistribTimeoutError(
                        "broadcast channel: the writer waited for remote reader "
                        f"{rank_list(self.remote_ranks)} (one or more of them) to take earlier "
                        "messages until the timeout; they are slow, stuck or not calling recv()",
                        missing=self.remote_ranks) from None
                if kind == MESSAGE:
                    self._check_readers()  # the reader we wait for may have died
                backoff = backoff or Backoff(now)
                backoff.pause(now)

    def close(self, seq: Optional[int], flush_seconds: float) -> None:
        """Tell the readers that message ``seq`` is not coming (the writer closed; None: say
        nothing), then close. Queued messages get ``flush_seconds`` in all to leave. Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + flush_seconds
        if seq is not None:
            try:
                self.send(seq, b"", deadline, kind=CLOSED)
            except DistribTimeoutError:
                logger.warning("broadcast channel: could not tell remote reader %s that the "
                               "writer closed (they are behind); they will time out",
                               rank_list(self.remote_ranks))
        self._socket.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        self._server.close()  # terminates the context: waits for the linger


class Subscriber:
    """A remote reader's end: a CURVE SUB connected to the writer's endpoint."""

    def __init__(self, secret: str, endpoint: str, rank: int, writer_rank: int, *, max_message: int,
                 hwm: int):
        import zmq

        self._zmq = zmq
        self.rank = rank
        self.writer_rank = writer_rank
        self._context = zmq.Context(io_threads=1)
        try:
            self._socket = client_socket(self._context, zmq.SUB, secret,
                                         max_message=max_message + _HEADER.size + 64)
            self._socket.setsockopt(zmq.RCVHWM, hwm)
            if endpoint.startswith("tcp://["):
                self._socket.ipv6 = True
            self._socket.connect(endpoint)
            # The data topic first, then the identity: when the writer sees the
            # identity, this connection is already subscribed to everything.
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
            self._socket.setsockopt(zmq.SUBSCRIBE, _IDENTITY + str(rank).encode())
            # The connection's end (the writer died, or libzmq dropped it for an oversized
            # or malformed frame, telling the socket's user nothing) shows on its monitor.
            self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except BaseException:
            self._context.destroy(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.endpoint = endpoint
        self._next = 0
        self._closed_by_writer = False
        self._closed = False
        self._writer_gone = False  # its connection ended (without its CLOSED message, if unread)

    def read(self, deadline: float):
        """The next message's payload (bytes-like), or None once the writer closed and all is read."""
        zmq = self._zmq
        while not self._closed_by_writer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistribTimeoutError(
                    f"broadcast channel: no message from the writer (rank {self.writer_rank}) before "
                    "the timeout; it has not sent one, is stuck, or is unreachable. Pass a longer "
                    "timeout if it is just busy", missing=(self.writer_rank,))
            ready = dict(self._poller.poll(int(min(remaining, 1.0) * 1000) + 1))
            if self._monitor in ready:
                self._take_disconnects()
                self._writer_gone = True
            if self._socket not in ready:
                # Whatever arrived before the connection ended is read first.
                if self._writer_gone and not self._socket.poll(_DRAIN_MS, zmq.POLLIN):
                    raise CoordinatorError(
                        f"broadcast channel: the connection to the writer (rank {self.writer_rank}, "
                        f"{self.endpoint}) ended without its closing the channel: it exited, its "
                        "network failed, or it sent a message over this reader's size limit. Every "
                        "whole message it sent was received; a message it was sending is dropped")
                continue
            frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            parsed = self._parse(frames)
            if parsed is None:
                continue
            seq, kind, payload = parsed
            self._next = seq + 1
            if kind == CLOSED:
                self._closed_by_writer = True
                break
            return payload
        return None

    def _take_disconnects(self) -> None:
        """Read the monitor's events (there is only the one kind: the connection ended)."""
        while self._monitor.poll(0):
            self._monitor.recv_multipart(self._zmq.NOBLOCK)

    def _parse(self, frames) -> Optional[tuple[int, int, memoryview]]:
        """(sequence, kind, payload) of a well-formed frame pair in order; None (logged) otherwise."""
        if len(frames) != 2 or len(frames[0]) != _HEADER.size:
            logger.warning("broadcast channel: dropped a malformed message from the writer (rank %d): "
                           "%d frames, header of %d bytes", self.writer_rank, len(frames),
                           len(frames[0]) if frames else 0)
            return None
        seq, kind = _HEADER.unpack(frames[0].buffer)
        if kind not in (MESSAGE, CLOSED):
            logger.warning("broadcast channel: dropped a message of unknown kind %d from the writer "
                           "(rank %d)", kind, self.writer_rank)
            return None
        if seq < self._next:
            logger.warning("broadcast channel: dropped a repeated message %d from the writer (rank %d)",
                           seq, self.writer_rank)
            return None
        if seq > self._next:
            raise CoordinatorError(
                f"broadcast channel: messages {self._next}..{seq - 1} from the writer (rank "
                f"{self.writer_rank}) never arrived (the connection was lost and re-made?); this "
                "reader is out of step and the channel cannot recover. Create a new channel")
        return seq, kind, frames[1].buffer

    def close(self) -> None:
        """Disconnect; the writer stops sending to this reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        linger = 0
        if not (self._closed_by_writer or self._writer_gone):
            # Tell the writer this reader closes (its connection's end is then no death).
            self._socket.setsockopt(self._zmq.SUBSCRIBE, _CLOSING + str(self.rank).encode())
            linger = _CLOSING_LINGER_MS
        self._socket.close(linger=linger)
        self._context.term()
