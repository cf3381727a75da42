"""The shared-memory ring on its own: one process, reader threads or forked peers."""
from __future__ import annotations

import logging
import multiprocessing
import os
import stat
import threading
import time

import pytest

from distrib.control import _shm_ring
from distrib.control._shm_ring import RingReader, RingWriter
from distrib.errors import CoordinatorError, DistribTimeoutError

pytestmark = pytest.mark.timeout(60)

SHAPE = dict(chunks=4, chunk_bytes=256)


def _pair(readers: int = 1, ranks=None, chunks: int = SHAPE["chunks"]):
    ranks = ranks or list(range(1, readers + 1))
    shape = {**SHAPE, "chunks": chunks}
    writer = RingWriter.create(readers=[(rank, os.getpid()) for rank in ranks], **shape)
    ends = [RingReader(writer.path, i, readers=readers, writer_rank=0, writer_pid=os.getpid(),
                       max_bytes=1 << 30, **shape) for i in range(readers)]
    writer.unlink()  # as the channel does once every reader has it open: nothing can leak
    return writer, ends


def _soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def _drain(reader: RingReader, out: list, delay: float = 0.0) -> None:
    while True:
        message = reader.read(_soon())
        if message is None:
            return
        out.append(bytes(message))
        time.sleep(delay)


def test_the_file_is_private_and_unlinked():
    writer = RingWriter.create(readers=[(1, os.getpid())], **SHAPE)
    path = writer.path
    try:
        assert path.startswith("/dev/shm/distrib-channel-") and len(path) > 50  # an unguessable name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        writer.close()
    assert not os.path.exists(path)


def test_messages_of_every_size_arrive_in_order():
    writer, readers = _pair(readers=2)
    sizes = [0, 1, 255, 256, 257, 1024, 1025, 5000, 3]  # within a chunk, several, more than the ring
    messages = [bytes([n % 256]) * n for n in sizes] * 3
    got: list[list] = [[], []]
    threads = [threading.Thread(target=_drain, args=(r, g)) for r, g in zip(readers, got)]
    for t in threads:
        t.start()
    for m in messages:
        writer.write(m, _soon())
    writer.close()
    for t in threads:
        t.join(10)
    assert got == [messages, messages]


def test_a_slow_reader_holds_the_writer_back_and_a_stopped_one_is_named():
    writer, (reader,) = _pair(ranks=[5])
    got: list = []
    thread = threading.Thread(target=_drain, args=(reader, got, 0.02))
    thread.start()
    started = time.monotonic()
    messages = [bytes([i]) * 200 for i in range(20)]  # one chunk each; the ring holds 4
    for m in messages:
        writer.write(m, _soon())
    assert time.monotonic() - started > 0.02 * 14  # it waited for the reader
    writer.close()
    thread.join(10)
    assert got == messages

    writer, (reader,) = _pair(ranks=[5])
    for i in range(4):
        writer.write(b"fits", _soon())
    started = time.monotonic()
    with pytest.raises(DistribTimeoutError, match=r"rank 5 to read") as caught:
        writer.write(b"does not fit", time.monotonic() + 0.3)
    assert caught.value.missing == (5,) and not caught.value.partial
    assert 0.3 <= time.monotonic() - started < 3
    assert bytes(reader.read(_soon())) == b"fits"  # a retry can go on after the reader moves
    writer.write(b"now it fits", _soon())
    reader.close()  # a closed reader is never waited for
    for i in range(20):
        writer.write(b"x" * 600, _soon(1))
    writer.close()


def test_reader_timeout_names_the_writer_and_a_closed_writer_is_drained_first():
    writer, (reader,) = _pair()
    with pytest.raises(DistribTimeoutError, match=r"writer \(rank 0\)") as caught:
        reader.read(time.monotonic() + 0.2)
    assert caught.value.missing == (0,)
    writer.write(b"one", _soon())
    writer.write(b"two" * 200, _soon())
    writer.close()
    writer.close()
    assert bytes(reader.read(_soon())) == b"one"
    assert bytes(reader.read(_soon())) == b"two" * 200
    assert reader.read(_soon()) is None
    assert reader.read(_soon()) is None


def test_a_reader_timeout_in_the_middle_of_a_long_message_loses_nothing():
    writer, (reader,) = _pair()
    gate, wait_for_slot = threading.Event(), writer._wait_for_slot

    def held_at_chunk_3(seq, deadline):  # the writer stalls after three of six chunks
        if seq == 3:
            gate.wait(10)
        wait_for_slot(seq, deadline)

    writer._wait_for_slot = held_at_chunk_3
    message = bytes(range(256)) * 6
    thread = threading.Thread(target=writer.write, args=(message, _soon()))
    thread.start()
    with pytest.raises(DistribTimeoutError):
        reader.read(time.monotonic() + 0.3)
    gate.set()
    assert bytes(reader.read(_soon())) == message
    thread.join(10)
    writer.close()


def _writer_that_dies(conn) -> None:
    writer = RingWriter.create(readers=[(1, os.getppid())], **SHAPE)
    conn.send((writer.path, os.getpid()))
    conn.recv()  # the reader has it open
    writer.unlink()
    writer.write(b"last words", _soon())
    os._exit(0)  # no close()


def _reader_of_a_forked_writer(target):
    """A writer forked to run ``target(conn)``, and a reader of its ring that it has been told about."""
    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe()
    process = fork.Process(target=target, args=(child,))
    process.start()
    path, pid = parent.recv()
    reader = RingReader(path, 0, readers=1, writer_rank=3, writer_pid=pid, max_bytes=1 << 20, **SHAPE)
    parent.send("open")
    return parent, process, pid, reader


def test_a_reader_notices_a_dead_writer_at_once():
    parent, process, pid, reader = _reader_of_a_forked_writer(_writer_that_dies)
    assert bytes(reader.read(_soon())) == b"last words"
    process.join(10)
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match=r"writer \(rank 3, pid \d+\) exited without closing"):
        reader.read(_soon(30))
    assert time.monotonic() - started < 5
    reader.close()


def _reader_that_dies(conn, writer_pid: int) -> None:
    RingReader(conn.recv(), 0, readers=1, writer_rank=0, writer_pid=writer_pid, max_bytes=1 << 20, **SHAPE)
    conn.send("open")
    os._exit(0)  # no close()


def test_the_writer_notices_a_dead_reader_at_once():
    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe()
    process = fork.Process(target=_reader_that_dies, args=(child, os.getpid()))
    process.start()
    writer = RingWriter.create(readers=[(7, process.pid)], **SHAPE)
    parent.send(writer.path)
    assert parent.recv() == "open"
    writer.unlink()
    process.join(10)
    for i in range(4):
        writer.write(b"fits", _soon())
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match=r"reader rank 7 exited without closing"):
        writer.write(b"blocked", _soon(30))
    assert time.monotonic() - started < 5
    writer.close()


def test_malformed_chunks_are_logged_and_dropped(caplog):
    writer, (reader,) = _pair(chunks=8)
    view = writer.view
    caplog.set_level(logging.WARNING, logger="distrib.control")
    # Corrupt each published chunk in a different way, then send a good one.
    first_last = _shm_ring.FIRST | _shm_ring.LAST
    corruptions = [((10_000, first_last, 10_000), "length 10000 (max 256)"),
                   ((4, 0, 4), "continues a message that never started"),
                   ((4, first_last, 2 << 30), "over the limit"),
                   ((4, first_last, 5), "claims 5"),
                   ((4, 0x80 | _shm_ring.FIRST, 4), "flags 0x81")]
    for values, _ in corruptions:
        seq = writer._next
        writer.write(b"abcd", _soon())
        _shm_ring._META.pack_into(view, writer.slot(seq) + 8, *values)
    writer.write(b"good", _soon())
    assert bytes(reader.read(_soon())) == b"good"
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == len(corruptions), dropped  # one line per bad message
    for (_, words), line in zip(corruptions, dropped):
        assert words in line
    writer.close()
    reader.close()


def test_a_ring_that_cannot_be_made_or_opened_says_why(tmp_path):
    with pytest.raises(CoordinatorError, match="could not create a shared-memory ring"):
        RingWriter.create(readers=[(1, os.getpid())], dirs=[str(tmp_path / "missing")], **SHAPE)
    writer = RingWriter.create(readers=[(1, os.getpid())], dirs=[str(tmp_path)], **SHAPE)
    with pytest.raises(CoordinatorError, match="unexpected header"):
        RingReader(writer.path, 0, readers=1, writer_rank=0, writer_pid=os.getpid() + 1,
                   max_bytes=1 << 20, **SHAPE)
    with pytest.raises(CoordinatorError, match="is not the writer's"):
        RingReader(writer.path, 0, readers=2, writer_rank=0, writer_pid=os.getpid(),
                   max_bytes=1 << 20, **SHAPE)
    writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_shm_ring.FUTEX is None, reason="futexes need Linux")
def test_a_sleeping_reader_is_woken_by_the_writer(monkeypatch):
    """Past the spin phase a reader sleeps on a futex for up to 50 ms; the writer must wake it."""
    from distrib.control import _waiting

    monkeypatch.setattr(_waiting, "SPIN_SECONDS", 0.0)  # sleep at once
    writer, (reader,) = _pair(readers=1)
    delays = []
    try:
        for _ in range(7):
            got = {}

            def receive():
                reader.read(_soon())
                got["at"] = time.monotonic()

            thread = threading.Thread(target=receive)
            thread.start()
            time.sleep(0.3)  # long enough for the reader's sleeps to reach their 50 ms cap
            sent = time.monotonic()
            writer.write(b"wake up", _soon())
            thread.join(timeout=10)
            delays.append(got["at"] - sent)
    finally:
        writer.close()
        reader.close()
    delays.sort()
    # Unwoken, a reader would see the message after half its 50 ms sleep on average.
    assert delays[len(delays) // 2] < 0.010, delays


def _writer_killed_mid_message(conn) -> None:
    writer = RingWriter.create(readers=[(1, os.getppid())], **SHAPE)
    conn.send((writer.path, os.getpid()))
    conn.recv()  # the reader has it open
    writer.unlink()
    writer.write(b"whole", _soon())
    conn.send("streaming")
    writer.write(b"x" * 10_000, _soon(60))  # 40 chunks through a ring of 4: blocks until killed


def test_a_writer_killed_mid_message_delivers_no_part_of_it():
    parent, process, pid, reader = _reader_of_a_forked_writer(_writer_killed_mid_message)
    assert parent.recv() == "streaming"
    time.sleep(0.3)  # the writer has filled the ring with the message's first chunks
    os.kill(pid, 9)
    process.join(10)
    assert bytes(reader.read(_soon())) == b"whole"
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match=r"writer \(rank 3, pid \d+\) exited without closing"):
        reader.read(_soon(30))  # the torn message is dropped, never returned
    assert time.monotonic() - started < 5
    reader.close()
