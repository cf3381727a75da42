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
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Optional, Sequence

from .._text import format_ranks
from ..errors import CoordinatorError, DistribTimeoutError
from ._security import SecureServer, client_socket
from ._waiting import Backoff

__all__ = ["Publisher", "Subscriber"]

logger = logging.getLogger("distrib.control")

_HEADER = struct.Struct("<QB")  # sequence, kind
MESSAGE, CLOSED = 0, 1
_IDENTITY = b"\xffdistrib-channel-reader:"  # + the reader's rank, as a subscription topic
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
                    f"broadcast channel: remote reader ranks {format_ranks(missing)} did not subscribe "
                    f"to the writer's endpoint {self.endpoint} before the timeout; check that their "
                    "nodes can reach this address (or set DISTRIB_BIND_ADDR)", missing=missing)
            if not self._socket.poll(int(min(remaining, 1.0) * 1000) + 1, zmq.POLLIN):
                continue
            frame = self._socket.recv(zmq.NOBLOCK)
            if frame[:1] == b"\x01" and frame[1:].startswith(_IDENTITY):
                try:
                    self._subscribed.add(int(frame[1 + len(_IDENTITY):]))
                except ValueError:
                    logger.warning("broadcast channel: ignored a malformed subscription frame")

    def send(self, seq: int, payload, deadline: float, kind: int = MESSAGE) -> None:
        """Queue message ``seq``; waits while a reader is a high-water mark behind, until ``deadline``."""
        zmq = self._zmq
        frames = [_HEADER.pack(seq, kind), payload]
        backoff = None
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
                        "broadcast channel: the writer waited for remote reader ranks "
                        f"{format_ranks(self.remote_ranks)} (one or more of them) to take earlier "
                        "messages until the timeout; they are slow, stuck or not calling recv()",
                        missing=self.remote_ranks) from None
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
                logger.warning("broadcast channel: could not tell remote reader ranks %s that the "
                               "writer closed (they are behind); they will time out",
                               format_ranks(self.remote_ranks))
        self._socket.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        self._server.close()  # terminates the context: waits for the linger


class Subscriber:
    """A remote reader's end: a CURVE SUB connected to the writer's endpoint."""

    def __init__(self, secret: str, endpoint: str, rank: int, writer_rank: int, *, max_message: int,
                 hwm: int):
        import zmq

        self._zmq = zmq
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
            # libzmq drops a connection that sends an oversized or malformed frame
            # without telling the socket's user; its monitor does, for the log.
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
        self._logged_disconnect = 0.0

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
            if self._socket not in ready:
                if self._monitor in ready:
                    self._note_disconnects()
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

    def _note_disconnects(self) -> None:
        """Log lost connections to the writer (at most one line every 5 seconds)."""
        zmq = self._zmq
        while self._monitor.poll(0):
            self._monitor.recv_multipart(zmq.NOBLOCK)  # an event; there is only the one kind
            if time.monotonic() - self._logged_disconnect > 5.0:
                self._logged_disconnect = time.monotonic()
                logger.warning("broadcast channel: the connection to the writer (rank %d, %s) was "
                               "dropped: a frame over the size limit or malformed, a network failure, "
                               "or the writer exited. zmq reconnects; if messages were lost, the next "
                               "one raises", self.writer_rank, self.endpoint)

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
        self._socket.close(linger=0)
        self._context.term()
