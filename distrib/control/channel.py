"""The broadcast channel: one writer rank sends small messages to every other rank, fast.

An inference engine's scheduler sends one small message per step to all its
workers; a gloo broadcast costs far too much for that. A channel is made once,
collectively, by :meth:`Coordinator.broadcast_channel`, then::

    channel = coord.broadcast_channel(src=0)      # every rank, in the same order
    if channel.is_writer:
        channel.send({"step": 7, "tokens": [1, 2], "x": TensorMeta.of(x)})
    else:
        message = channel.recv()
    # or, on every rank:  message = channel.broadcast(message_or_None)

Messages are msgpack (:mod:`.codec`): bytes, numbers, strings, lists, dicts,
and tensors as their metadata. Readers on the writer's node read a
shared-memory ring (:mod:`._shm_ring`); readers on other nodes a CURVE
authenticated zmq subscription (:mod:`._pubsub`), opened only when such readers
exist. Every reader receives every message, in order; a message larger than
the ring streams through it; a slow reader holds the writer back (up to the
timeout) instead of losing messages. Nothing received is unpickled, and a
malformed message is logged and dropped.

A channel is not thread-safe: use each end from one thread at a time.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional, Union

from .._text import format_ranks
from ..errors import ConfigError, CoordinatorError, DistribError, DistribTimeoutError
from . import codec

__all__ = ["BroadcastChannel", "ChannelClosed", "DEFAULT_CHUNK_BYTES", "DEFAULT_CHUNKS",
           "MAX_MESSAGE_BYTES"]

logger = logging.getLogger("distrib.control")

DEFAULT_CHUNK_BYTES = 64 << 10
DEFAULT_CHUNKS = 16
MAX_MESSAGE_BYTES = 1 << 30  # larger data belongs in a Communicator
_FLUSH_SECONDS = 10.0         # the most a writer's close() waits for remote readers to get the rest


class ChannelClosed(DistribError):
    """The channel was closed: by this rank, or (for a reader) by the writer after its last message."""


class BroadcastChannel:
    """One writer (rank :attr:`src`), every other rank a reader. Make it with
    :meth:`Coordinator.broadcast_channel` (or :meth:`create`), on every rank.

    ``timeout`` (seconds) bounds each :meth:`send` and :meth:`recv` unless the
    call passes its own; ``math.inf`` waits without bound (a dead writer on the
    reader's node is still noticed).
    """

    def __init__(self, *, rank: int, src: int, timeout: float, local_readers: tuple[int, ...],
                 remote_readers: tuple[int, ...], ring=None, publisher=None, subscriber=None,
                 endpoint: Optional[str] = None, names: Optional[tuple] = None):
        self.rank, self.src, self.timeout = rank, src, timeout
        self._names = names  # the global rank of each rank of the channel's coordinator
        self.local_readers, self.remote_readers = local_readers, remote_readers
        self.endpoint = endpoint  # the writer's zmq endpoint; None without remote readers
        self._ring, self._publisher, self._subscriber = ring, publisher, subscriber
        self._sent = 0
        self._broken: Optional[str] = None
        self._closed = False

    # -- creation (collective) ---------------------------------------------------------
    @classmethod
    def create(cls, coordinator, src: int = 0, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               chunks: int = DEFAULT_CHUNKS, timeout: Optional[float] = None,
               shared_memory: bool = True) -> "BroadcastChannel":
        """Make the channel on every rank of ``coordinator`` (collective, same arguments everywhere).

        ``shared_memory=False`` sends to every reader through zmq, as if each
        were on another node (for tests, or where /dev/shm is unusable). If
        any rank fails to set up its end, every rank raises, naming it.
        """
        from ._shm_ring import RingReader, RingWriter

        rank, world = coordinator.rank, coordinator.world_size
        # Rank r of a group is global rank names[r]: what the ends' messages say.
        names = tuple(getattr(coordinator, "ranks", range(world)))
        seconds = _default_timeout(coordinator) if timeout is None else timeout
        problem = _argument_problem(src, chunk_bytes, chunks, seconds, world)
        setup = None if problem or math.isinf(seconds) else seconds  # inf: the coordinator's own bound
        # 1. Where is everyone (and were the arguments right everywhere)?
        mine = codec.encode({"node": coordinator.node_rank, "pid": os.getpid(), "error": problem})
        peers = [codec.decode(b) for b in coordinator.all_gather(mine, timeout=setup)]
        bad = {r: p["error"] for r, p in enumerate(peers) if p["error"]}
        if bad:
            raise ConfigError("broadcast_channel: " + "; ".join(f"rank {names[r]}: {e}" for r, e in bad.items()))
        node = peers[src]["node"]
        local = tuple(r for r in range(world) if r != src and shared_memory and peers[r]["node"] == node)
        remote = tuple(r for r in range(world) if r != src and r not in local)
        hwm = max(chunks, 16)
        ring: Union[RingWriter, RingReader, None] = None
        publisher = subscriber = None
        try:
            # 2. The writer makes the ring and the socket, and says where they are.
            offer: dict = {}
            if rank == src:
                try:
                    if local:
                        ring = RingWriter.create(chunks=chunks, chunk_bytes=chunk_bytes,
                                                 readers=[(names[r], peers[r]["pid"]) for r in local])
                        offer["path"] = ring.path
                    if remote:
                        publisher = _publisher(coordinator.info, tuple(names[r] for r in remote), hwm)
                        offer["endpoint"] = publisher.endpoint
                except Exception as exc:  # reported to every rank just below
                    offer = {"error": _describe(exc)}
            offer = codec.decode(coordinator.broadcast(codec.encode(offer) if rank == src else b"",
                                                       src=src, timeout=setup))
            if offer.get("error"):
                raise CoordinatorError(f"broadcast_channel: the writer (rank {names[src]}) could not set up "
                                       f"the channel: {offer['error']}")
            # 3. The readers open their ends; then everyone learns whether all did.
            error = None
            try:
                if rank in local:
                    ring = RingReader(offer["path"], local.index(rank), chunks=chunks,
                                      chunk_bytes=chunk_bytes, readers=len(local), writer_rank=names[src],
                                      writer_pid=peers[src]["pid"], max_bytes=MAX_MESSAGE_BYTES)
                elif rank in remote:
                    subscriber = _subscriber(coordinator.info, offer["endpoint"], names[rank], names[src], hwm)
            except Exception as exc:  # reported to every rank just below
                error = _describe(exc)
            errors = [codec.decode(b) for b in coordinator.all_gather(codec.encode(error), timeout=setup)]
            if rank == src and isinstance(ring, RingWriter):
                ring.unlink()  # every local reader has it mapped (or failed): the name can go
            failed = {r: e for r, e in enumerate(errors) if e}
            if failed:
                raise CoordinatorError("broadcast_channel: readers could not join: "
                                       + "; ".join(f"rank {names[r]}: {e}" for r, e in failed.items()))
            # 4. No message may be sent before every remote reader is subscribed.
            if remote:
                verdict = None
                if rank == src:
                    try:
                        assert publisher is not None  # made in step 2 (or every rank raised there)
                        publisher.wait_subscribed(time.monotonic() + (setup or _default_timeout(coordinator)))
                    except DistribTimeoutError as exc:
                        verdict = {"error": str(exc), "missing": list(exc.missing)}
                    except Exception as exc:  # reported to every rank just below
                        verdict = {"error": f"the writer (rank {names[src]}): {_describe(exc)}", "missing": []}
                verdict = codec.decode(coordinator.broadcast(codec.encode(verdict) if rank == src else b"",
                                                             src=src, timeout=setup))
                if verdict and verdict["missing"]:
                    raise DistribTimeoutError(verdict["error"], missing=verdict["missing"])
                if verdict:
                    raise CoordinatorError(f"broadcast_channel: {verdict['error']}")
        except BaseException:
            for end in (ring, subscriber):
                if end is not None:
                    end.close()
            if publisher is not None:
                publisher.close(None, 0)
            raise
        return cls(rank=rank, src=src, timeout=seconds, local_readers=local, remote_readers=remote,
                   ring=ring, publisher=publisher, subscriber=subscriber,
                   endpoint=offer.get("endpoint"), names=names)

    # -- identity ---------------------------------------------------------------------
    @property
    def is_writer(self) -> bool:
        return self.rank == self.src

    @property
    def transport(self) -> str:
        """How this rank takes part: "writer", "shm" or "zmq" (a reader)."""
        if self.is_writer:
            return "writer"
        return "shm" if self.rank in self.local_readers else "zmq"

    # -- messages -----------------------------------------------------------------------
    def send(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send ``obj`` to every reader (writer only). Blocks while a reader is a ring behind.

        Raises :class:`~distrib.control.codec.MessageError` for what a message
        cannot carry, :class:`DistribTimeoutError` naming the readers that
        are behind if the wait passes ``timeout``, and :class:`CoordinatorError`
        naming readers that died without closing (on this node, when they hold
        the writer back; on others, once their connection ended). A timeout before any reader
        got part of the message leaves the channel usable (send again);
        otherwise it is broken and must be closed.
        """
        self._check_open()
        if not self.is_writer:
            raise CoordinatorError(f"send() on rank {self._name(self.rank)}: only the writer (rank "
                                   f"{self._name(self.src)}) sends "
                                   "on this channel; readers call recv() or broadcast()")
        if self._broken:
            raise CoordinatorError(f"this broadcast channel is broken ({self._broken}); close it and "
                                   "create a new one on every rank")
        data = codec.encode(obj)
        if len(data) > MAX_MESSAGE_BYTES:
            raise codec.MessageError(f"a message of {len(data)} bytes is over the channel's limit of "
                                     f"{MAX_MESSAGE_BYTES}; send bulk data through a Communicator")
        deadline = self._deadline(timeout)
        delivered = False
        try:
            if self._ring is not None:
                self._ring.write(data, deadline)
                delivered = True
            if self._publisher is not None:
                self._publisher.send(self._sent, data, deadline)
        except DistribTimeoutError as exc:
            if delivered or getattr(exc, "partial", False):
                self._broken = f"message {self._sent} timed out after reaching some readers"
            raise
        self._sent += 1

    def recv(self, timeout: Optional[float] = None) -> Any:
        """The next message from the writer (readers only), in the order sent.

        Raises :class:`ChannelClosed` once the writer closed and every message
        it sent was received; :class:`DistribTimeoutError` naming the writer
        if none comes within ``timeout``; :class:`CoordinatorError` if the
        writer died (on this node, its process is gone; on another, its
        connection ended), after every whole message it sent: never a part of one.
        """
        self._check_open()
        if self.is_writer:
            raise CoordinatorError(f"recv() on rank {self._name(self.rank)}, the writer of this channel; only "
                                   "readers receive. Use broadcast() to run the same code on every rank")
        end = self._ring if self._ring is not None else self._subscriber
        deadline = self._deadline(timeout)
        while True:
            data = end.read(deadline)
            if data is None:
                raise ChannelClosed(f"the writer (rank {self._name(self.src)}) closed this broadcast channel; "
                                    "every message it sent has been received")
            try:
                return codec.decode(data, MAX_MESSAGE_BYTES)
            except codec.MessageError as exc:
                logger.warning("broadcast channel: rank %d dropped a malformed message from the "
                               "writer (rank %d): %s", self._name(self.rank), self._name(self.src), exc)

    def broadcast(self, obj: Any = None, timeout: Optional[float] = None) -> Any:
        """On the writer: send ``obj`` and return it. On a reader: return the next message."""
        if self.is_writer:
            self.send(obj, timeout)
            return obj
        return self.recv(timeout)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release this rank's end. Idempotent; not a collective.

        Closing the writer lets readers drain what was sent, then raise
        :class:`ChannelClosed`; closing a reader means the writer no longer
        waits for it.
        """
        if self._closed:
            return
        self._closed = True
        for end in (self._ring, self._subscriber):
            if end is not None:
                end.close()
        if self._publisher is not None:
            self._publisher.close(self._sent, min(self.timeout, _FLUSH_SECONDS))

    def __enter__(self) -> "BroadcastChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BroadcastChannel(rank={self.rank}, src={self.src}, transport={self.transport!r}, "
                f"local_readers=[{format_ranks(self.local_readers)}], "
                f"remote_readers=[{format_ranks(self.remote_readers)}])")

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"this broadcast channel was closed on rank {self._name(self.rank)}")

    def _name(self, rank: int) -> int:
        """The global rank of ``rank`` (a rank of the channel's coordinator), for messages."""
        return self._names[rank] if self._names is not None else rank

    def _deadline(self, timeout: Optional[float]) -> float:
        seconds = self.timeout if timeout is None else timeout
        if not seconds > 0:
            raise ConfigError(f"timeout={timeout!r} must be > 0 seconds (math.inf waits without bound)")
        return time.monotonic() + seconds


def _default_timeout(coordinator) -> float:
    from ..coordinator.api import DEFAULT_TIMEOUT

    return float(getattr(coordinator, "timeout", DEFAULT_TIMEOUT))


def _argument_problem(src, chunk_bytes, chunks, timeout, world: int) -> Optional[str]:
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(src) or not 0 <= src < world:
        return f"src={src!r} is not a rank; expected 0 <= src < {world}"
    if not whole(chunk_bytes) or not 64 <= chunk_bytes <= 1 << 30:
        return f"chunk_bytes={chunk_bytes!r}; expected an int in 64 .. 2**30 (64 KiB is a good size)"
    if not whole(chunks) or not 2 <= chunks <= 1 << 16:
        return f"chunks={chunks!r}; expected an int in 2 .. 65536"
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        return f"timeout={timeout!r}; expected seconds > 0 (or math.inf)"
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _publisher(info, remote: tuple[int, ...], hwm: int):
    from .._network import local_address_towards
    from ._pubsub import Publisher
    from ._security import bind_address

    host = bind_address(local_address_towards(info.master_addr, info.master_port) or "127.0.0.1")
    return Publisher(info.secret, host, remote, hwm=hwm)


def _subscriber(info, endpoint: str, rank: int, src: int, hwm: int):
    from ._pubsub import Subscriber

    return Subscriber(info.secret, endpoint, rank, src, max_message=MAX_MESSAGE_BYTES, hwm=hwm)
