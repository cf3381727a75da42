"""A shared-memory ring of chunks: one writer, a fixed set of readers on one node.

The writer creates the file (``O_CREAT | O_EXCL``, mode 0600, an unguessable
name under /dev/shm), the readers map it while the channel is being created,
and the writer unlinks it as soon as every reader has it mapped: nothing is
left behind, even when a process is killed later.

Layout (every counter one aligned 8-byte word; lines of 64 bytes so readers'
counters never share a cache line)::

    line 0           header: magic, version, chunks, chunk bytes, readers,
                     writer pid, closed flag
    lines 1..R       one per reader: chunks consumed (GONE once it closed)
    sleeper lines    one byte per reader: 1 while it sleeps on a futex
    slots 0..N-1     [sequence u64 | length u32 | flags u32 | total u64 |
                      pad to 32 | payload of chunk_bytes], rounded to 64

Protocol. Chunks are numbered 0, 1, 2, ... across messages; chunk ``s`` lives
in slot ``s % N``. The writer writes chunk ``s`` only once every reader has
consumed chunk ``s - N`` (its counter is >= ``s - N + 1``): a slow reader holds
the writer back instead of losing data. It writes payload, length, flags,
then (fence) stores sequence ``s + 1``. A reader waits for sequence ``s + 1``,
(fence) copies the payload out, (fence) stores consumed ``s + 1``. A message
larger than one chunk streams over consecutive chunks (FIRST / LAST flags), so
a message larger than the whole ring works too. Closing the writer sets the
closed flag after its last sequence; readers drain, then see it.

Memory order. Python has no atomic loads and stores; the argument rests on:

1. Every counter is one naturally aligned 8-byte word, read and written with
   native ``struct`` (one fixed-size 8-byte memcpy in CPython, which compilers
   emit as one load or store). Aligned 8-byte accesses are single-copy atomic
   on x86-64 and AArch64: nobody ever sees a torn counter.
2. The order that matters: writer payload stores before its sequence store;
   reader's sequence load before its payload loads, and those loads before
   its consumed store; writer's consumed loads before it overwrites a slot.
   x86-64 (TSO) keeps store->store, load->load and load->store order in
   hardware; weakly ordered CPUs (AArch64, POWER) do not, so each of those
   points has :func:`full_fence`.
3. :func:`~._waiting.full_fence` is a full barrier made of lock operations
   (:mod:`._waiting` gives the argument).

Waiting (:class:`~._waiting.Backoff`) spins with ``sched_yield``, then sleeps
with growing intervals; on Linux a reader sleeps on a futex of the sequence
word it waits for, and the writer wakes it when it publishes (see
:meth:`RingWriter._wake` for why no wake-up is lost). Every wait has a deadline; the writer also watches its
readers' processes, and a reader its writer's, so a dead peer on this node is
reported at once rather than after the timeout.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
import struct
import tempfile
import time
from typing import Optional, Sequence, Union

from .._text import rank_list
from ..errors import CoordinatorError, DistribTimeoutError
from ._waiting import (FUTEX, WATCH_INTERVAL, Backoff, Futex, ProcessWatch, buffer_address,
                       full_fence)

__all__ = ["RingWriter", "RingReader", "ring_bytes", "SHM_DIRS"]

logger = logging.getLogger("distrib.control")

SHM_DIRS: tuple[str, ...] = ("/dev/shm", tempfile.gettempdir())  # tried in order
MAGIC = b"DRINGv02"
VERSION = 2
LINE = 64
CHUNK_HEADER = 32
FIRST, LAST = 1, 2
GONE = (1 << 64) - 1  # a closed reader's counter: the writer never waits for it

_HEADER = struct.Struct("@8sIIIIQQ")  # magic, version, chunks, chunk bytes, readers, pid, closed
_CLOSED = 32                          # offset of the closed flag in the header
_WORD = struct.Struct("@Q")           # one aligned 8-byte counter
_META = struct.Struct("@IIQ")         # length, flags, total, at slot offset 8


def _slot_bytes(chunk_bytes: int) -> int:
    return (CHUNK_HEADER + chunk_bytes + LINE - 1) // LINE * LINE


def _sleep_lines(readers: int) -> int:
    return (readers + LINE - 1) // LINE


def ring_bytes(readers: int, chunks: int, chunk_bytes: int) -> int:
    """Size of the ring file for this shape."""
    return LINE * (1 + readers + _sleep_lines(readers)) + chunks * _slot_bytes(chunk_bytes)


class _Ring:
    """The mapped file; shared by both ends."""

    def __init__(self, fd: int, size: int):
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self.closed = False

    def _shape(self, chunks: int, chunk_bytes: int, readers: int) -> None:
        self.chunks, self.chunk_bytes, self.readers = chunks, chunk_bytes, readers
        self.slot_bytes = _slot_bytes(chunk_bytes)
        self.sleepers_at = LINE * (1 + readers)  # one byte per reader: 1 while it sleeps on a futex
        self.slots_at = LINE * (1 + readers + _sleep_lines(readers))
        self.address = buffer_address(self._map) if FUTEX is not None else 0

    def slot(self, seq: int) -> int:
        return self.slots_at + (seq % self.chunks) * self.slot_bytes

    def unmap(self) -> None:
        if not self.closed:
            self.closed = True
            self.view.release()
            self._map.close()


class RingWriter(_Ring):
    """The writing end. Create with :meth:`create`; :meth:`unlink` once every reader has it open."""

    def __init__(self, path: str, fd: int, *, chunks: int, chunk_bytes: int,
                 readers: Sequence[tuple[int, int]]):
        super().__init__(fd, ring_bytes(len(readers), chunks, chunk_bytes))
        self._shape(chunks, chunk_bytes, len(readers))
        self.path: Optional[str] = path
        self.reader_ranks = [rank for rank, _ in readers]
        self._watches = [ProcessWatch(pid) for _, pid in readers]
        self._next = 0          # the next chunk number to write
        self._min_consumed = 0  # a lower bound of every reader's counter
        self._awake = bytes(len(readers))  # the sleeper bytes when nobody sleeps
        _HEADER.pack_into(self.view, 0, MAGIC, VERSION, chunks, chunk_bytes, len(readers), os.getpid(), 0)

    @classmethod
    def create(cls, *, chunks: int, chunk_bytes: int, readers: Sequence[tuple[int, int]],
               dirs: Optional[Sequence[str]] = None) -> "RingWriter":
        """Make the file in the first usable directory of ``dirs``; ``readers`` are (rank, pid)."""
        size = ring_bytes(len(readers), chunks, chunk_bytes)
        failures = []
        for folder in (SHM_DIRS if dirs is None else dirs):
            path = os.path.join(folder, f"distrib-channel-{secrets.token_hex(16)}")
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                failures.append(f"{folder}: {exc.strerror or exc}")
                continue
            try:
                # Reserve the pages now: a full tmpfs fails here with an error,
                # not later with SIGBUS on a store into the mapping.
                os.posix_fallocate(fd, 0, size)
                return cls(path, fd, chunks=chunks, chunk_bytes=chunk_bytes, readers=readers)
            except OSError as exc:
                os.unlink(path)
                failures.append(f"{folder}: {exc.strerror or exc}")
            finally:
                os.close(fd)
        raise CoordinatorError(f"could not create a shared-memory ring of {size} bytes "
                               f"({'; '.join(failures)}); free space in /dev/shm or pass smaller "
                               "chunk_bytes / chunks")

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay valid). Idempotent."""
        path, self.path = self.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def write(self, data, deadline: float) -> None:
        """Stream ``data`` into the ring, waiting for slow readers until ``deadline``.

        Returns once every chunk is published. Raises
        :class:`DistribTimeoutError` naming the readers that are behind; the
        flag ``partial`` on the exception says whether some chunks of this
        message were already published (the stream is then broken).
        """
        view, data = self.view, memoryview(data)
        total, cap = len(data), self.chunk_bytes
        offset = 0
        while True:
            piece = data[offset:offset + cap]
            flags = (FIRST if offset == 0 else 0) | (LAST if offset + len(piece) >= total else 0)
            seq = self._next
            try:
                self._wait_for_slot(seq, deadline)
            except DistribTimeoutError as exc:
                exc.partial = offset > 0  # type: ignore[attr-defined]
                raise
            base = self.slot(seq)
            full_fence()  # the readers' counters were read before we overwrite their slot
            view[base + CHUNK_HEADER:base + CHUNK_HEADER + len(piece)] = piece
            _META.pack_into(view, base + 8, len(piece), flags, total)
            full_fence()  # payload and length are visible before the sequence that publishes them
            _WORD.pack_into(view, base, seq + 1)
            self._wake(base)
            self._next = seq + 1
            offset += len(piece)
            if flags & LAST:
                return

    def _wake(self, base: int) -> None:
        """Wake the readers sleeping on the slot at ``base`` (if any sleeps: no system call otherwise).

        A reader raises its sleeper byte, fences, and looks at the sequence
        once more before it sleeps; the writer stores the sequence, fences,
        and looks at the sleeper bytes. With a full fence on each side, at
        least one of the two sees the other's store: either the reader sees
        the new sequence and does not sleep, or the writer sees the byte and
        wakes it (and a wake before the sleep makes the futex wait return at
        once, since the word no longer holds the value it waits on).
        """
        if FUTEX is None:
            return
        full_fence()
        if self.view[self.sleepers_at:self.sleepers_at + self.readers] != self._awake:
            FUTEX.wake(self.address + base)

    def _consumed(self) -> list[int]:
        return [_WORD.unpack_from(self.view, LINE * (1 + i))[0] for i in range(self.readers)]

    def _wait_for_slot(self, seq: int, deadline: float) -> None:
        need = seq - self.chunks + 1
        if need <= self._min_consumed:
            return
        now = time.monotonic()
        backoff, watch_at = Backoff(now), now + WATCH_INTERVAL
        while True:
            counters = self._consumed()
            self._min_consumed = min(counters)
            if self._min_consumed >= need:
                return
            behind = [i for i, c in enumerate(counters) if c < need]
            now = time.monotonic()
            if now >= deadline:
                ranks = [self.reader_ranks[i] for i in behind]
                raise DistribTimeoutError(
                    f"broadcast channel: the writer waited for {rank_list(ranks)} to read "
                    "earlier messages until the timeout; they are slow, stuck or not calling recv(). "
                    "Call recv() on every reader (or close() on those that are done), or pass a "
                    "longer timeout", missing=ranks)
            if now >= watch_at:
                watch_at = now + WATCH_INTERVAL
                dead = [self.reader_ranks[i] for i in behind if self._watches[i].dead()]
                if dead:
                    raise CoordinatorError(
                        f"broadcast channel: reader {rank_list(dead)} exited without closing "
                        "the channel; the writer cannot deliver to them. Check their output")
            backoff.pause(now)

    def close(self) -> None:
        """Tell the readers no more chunks come (they drain first), unlink and unmap. Idempotent."""
        self.unlink()
        if self.closed:
            return
        full_fence()  # every published chunk is visible before the closed flag
        _WORD.pack_into(self.view, _CLOSED, 1)
        for seq in range(self._next, self._next + self.chunks):  # sleepers wait on upcoming slots
            self._wake(self.slot(seq))
        self.unmap()


class RingReader(_Ring):
    """One reading end, the ``index``-th reader of the ring at ``path``."""

    def __init__(self, path: str, index: int, *, chunks: int, chunk_bytes: int, readers: int,
                 writer_rank: int, writer_pid: int, max_bytes: int):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            stat = os.fstat(fd)
            size = ring_bytes(readers, chunks, chunk_bytes)
            if stat.st_uid != os.getuid() or stat.st_size != size:
                raise CoordinatorError(f"shared-memory ring {path} is not the writer's (owner "
                                       f"{stat.st_uid}, {stat.st_size} bytes; expected owner "
                                       f"{os.getuid()}, {size} bytes)")
            super().__init__(fd, size)
        finally:
            os.close(fd)
        self._shape(chunks, chunk_bytes, readers)
        header = _HEADER.unpack_from(self.view, 0)
        if header[:6] != (MAGIC, VERSION, chunks, chunk_bytes, readers, writer_pid):
            self.unmap()
            raise CoordinatorError(f"shared-memory ring {path} has an unexpected header; "
                                   "was it made by another version of distrib?")
        if not 0 <= index < readers:
            raise ValueError(f"reader index {index} is not in 0..{readers - 1}")
        self.index, self.writer_rank, self.max_bytes = index, writer_rank, max_bytes
        self._counter = LINE * (1 + index)
        self._sleeper = self.sleepers_at + index
        self._watch = ProcessWatch(writer_pid)
        self._next = _WORD.unpack_from(self.view, self._counter)[0]
        self._message: Optional[bytearray] = None  # a multi-chunk message being assembled
        self._filled = 0
        self._skipping = False  # dropping the rest of a malformed message

    def read(self, deadline: float) -> Union[bytes, bytearray, None]:
        """The next whole message (a bytes-like object), or None once the writer closed and all is read.

        Malformed chunks (lengths or flags that do not fit) are logged and
        their message dropped; reading goes on with the next message. A
        timeout in the middle of a long message keeps what was read: the next
        call goes on from there.
        """
        while True:
            seq = self._next
            base = self.slot(seq)
            if not self._wait_for_sequence(base, seq + 1, deadline):
                return None
            full_fence()  # the sequence was read before the payload
            done = self._take(seq, base)
            full_fence()  # the payload was copied out before the slot is handed back
            _WORD.pack_into(self.view, self._counter, seq + 1)
            self._next = seq + 1
            if done is not None:
                return done

    def _take(self, seq: int, base: int) -> Union[bytes, bytearray, None]:
        """Copy chunk ``seq`` out; returns the message it completes, if any."""
        view, cap = self.view, self.chunk_bytes
        length, flags, total = _META.unpack_from(view, base + 8)
        start, problem = base + CHUNK_HEADER, None
        done: Union[bytes, bytearray, None] = None
        if length > cap or flags & ~(FIRST | LAST):
            problem = f"chunk {seq} has length {length} (max {cap}) and flags {flags:#x}"
        elif flags & FIRST:
            if self._message is not None:  # (a message being skipped was reported already)
                logger.warning("broadcast channel: dropped an incomplete message from the writer "
                               "(rank %d): chunk %d starts a new one", self.writer_rank, seq)
            self._message, self._skipping = None, False
            if total > self.max_bytes:
                problem = f"a message of {total} bytes is over the limit of {self.max_bytes}"
            elif flags & LAST:
                if length == total:
                    done = bytes(view[start:start + length])
                else:
                    problem = f"a single-chunk message of {length} bytes claims {total}"
            elif length != cap:
                problem = f"the first chunk of a {total}-byte message holds only {length} bytes"
            else:
                self._message = bytearray(total)
                self._message[:length] = view[start:start + length]
                self._filled = length
        elif self._skipping:
            self._skipping = not flags & LAST
        elif self._message is None:
            problem = f"chunk {seq} continues a message that never started"
        elif self._filled + length > len(self._message) or (
                flags & LAST and self._filled + length != len(self._message)):
            problem = f"chunk {seq} overruns or cuts short its {len(self._message)}-byte message"
        else:
            self._message[self._filled:self._filled + length] = view[start:start + length]
            self._filled += length
            if flags & LAST:
                done, self._message = self._message, None
        if problem is not None:
            logger.warning("broadcast channel: dropped a malformed message from the writer "
                           "(rank %d): %s", self.writer_rank, problem)
            self._message, self._skipping = None, not flags & LAST
        return done

    def _wait_for_sequence(self, base: int, want: int, deadline: float) -> bool:
        """Wait until the slot at ``base`` holds sequence ``want``; False if the writer closed first."""
        view, load = self.view, _WORD.unpack_from
        if load(view, base)[0] == want:
            return True
        now = time.monotonic()
        backoff, watch_at = Backoff(now), now + WATCH_INTERVAL
        while True:
            seq = load(view, base)[0]
            if seq == want:
                return True
            if seq > want:
                raise CoordinatorError(f"broadcast channel: the shared-memory ring is out of step "
                                       f"(sequence {seq}, expected {want}); it was overwritten")
            if load(view, _CLOSED)[0]:
                full_fence()  # the flag was written after the last sequence: look once more
                if load(view, base)[0] == want:
                    return True
                return False
            now = time.monotonic()
            if now >= deadline:
                raise DistribTimeoutError(
                    f"broadcast channel: no message from the writer (rank {self.writer_rank}) "
                    "before the timeout; it has not sent one, or is stuck. Pass a longer timeout "
                    "if it is just busy", missing=(self.writer_rank,))
            if now >= watch_at:
                watch_at = now + WATCH_INTERVAL
                if self._watch.dead():
                    raise CoordinatorError(
                        f"broadcast channel: the writer (rank {self.writer_rank}, pid "
                        f"{self._watch.pid}) exited without closing the channel; no more messages "
                        "will come. Check its output")
            futex = FUTEX
            if futex is None:
                backoff.pause(now)
            else:
                backoff.pause(now, lambda seconds: self._sleep(futex, base, seq,
                                                               min(seconds, deadline - now)))

    def _sleep(self, futex: Futex, base: int, seen: int, seconds: float) -> None:
        """Sleep until the writer changes the sequence at ``base`` (it wakes us; see RingWriter._wake)."""
        view = self.view
        view[self._sleeper] = 1
        full_fence()  # our sleeper byte is visible before we look at the sequence again
        try:
            if _WORD.unpack_from(view, base)[0] == seen and not _WORD.unpack_from(view, _CLOSED)[0]:
                futex.wait(self.address + base, seen, seconds)  # the low 32 bits of the sequence
        finally:
            view[self._sleeper] = 0

    def close(self) -> None:
        """Stop reading: the writer no longer waits for this reader. Idempotent."""
        if self.closed:
            return
        full_fence()  # our last copy-out is done before the writer may reuse the slot
        _WORD.pack_into(self.view, self._counter, GONE)
        self.unmap()
