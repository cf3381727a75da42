"""The zmq side of the channel on its own: bad frames, gaps, back-pressure, in one process;
a writer or a reader killed, in a forked one."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time

import pytest

from distrib.control import codec
from distrib.control._pubsub import _HEADER, CLOSED, MESSAGE, Publisher, Subscriber
from distrib.control.channel import BroadcastChannel, ChannelClosed
from distrib.errors import CoordinatorError, DistribTimeoutError

pytestmark = pytest.mark.timeout(60)

SECRET = "a-test-launch-secret"


@pytest.fixture
def link():
    """A publisher and one subscriber (rank 1) that it has seen subscribe."""
    publisher = Publisher(SECRET, "127.0.0.1", [1], hwm=4)
    subscriber = Subscriber(SECRET, publisher.endpoint, 1, 0, max_message=1 << 16, hwm=4)
    try:
        publisher.wait_subscribed(time.monotonic() + 10)
        yield publisher, subscriber
    finally:
        subscriber.close()
        publisher.close(None, 0)


def _soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def test_malformed_frames_are_logged_and_dropped_and_the_reader_goes_on(link, caplog):
    publisher, subscriber = link
    caplog.set_level(logging.WARNING, logger="distrib.control")
    raw = publisher._socket
    raw.send_multipart([b"just one frame"])
    raw.send_multipart([b"short", b"payload"])
    raw.send_multipart([_HEADER.pack(0, 7), b"unknown kind"])
    raw.send_multipart([_HEADER.pack(0, MESSAGE), b"\xc1", b"three frames"])
    publisher.send(0, codec.encode("first"), _soon())
    publisher.send(0, codec.encode("repeated"), _soon())  # an old sequence number
    publisher.send(1, b"\xc1 not msgpack", _soon())        # decodes to nothing
    publisher.send(2, codec.encode({"x": [1, 2]}), _soon())
    publisher.send(3, b"", _soon(), kind=CLOSED)
    channel = BroadcastChannel(rank=1, src=0, timeout=10, local_readers=(), remote_readers=(1,),
                               subscriber=subscriber)
    assert channel.recv() == "first"
    assert channel.recv() == {"x": [1, 2]}
    with pytest.raises(ChannelClosed, match=r"writer \(rank 0\) closed"):
        channel.recv()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("dropped" in line for line in lines) == 6, lines
    assert any("unknown kind 7" in line for line in lines)
    assert any("repeated message 0" in line for line in lines)
    assert any("not a valid message" in line for line in lines)


def test_a_gap_in_the_sequence_raises_instead_of_losing_messages(link):
    publisher, subscriber = link
    publisher.send(0, codec.encode(0), _soon())
    publisher.send(2, codec.encode(2), _soon())
    assert codec.decode(subscriber.read(_soon())) == 0
    with pytest.raises(CoordinatorError, match=r"messages 1..1 from the writer \(rank 0\) never arrived"):
        subscriber.read(_soon())


def test_an_oversized_frame_is_refused_and_the_reader_raises_naming_the_writer(link):
    publisher, subscriber = link
    publisher.send(0, b"\x00" * (1 << 17), _soon())  # over the reader's 64 KiB limit
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match=r"writer \(rank 0, .*over this reader's size limit"):
        subscriber.read(_soon(30))  # libzmq dropped the connection: no waiting for the timeout
    assert time.monotonic() - started < 5


def test_a_reader_that_does_not_read_holds_the_writer_back_until_the_timeout(link):
    publisher, subscriber = link
    blob = b"z" * 60_000
    sent = 0
    with pytest.raises(DistribTimeoutError, match=r"remote reader rank 1") as caught:
        while sent < 10_000:  # the high-water marks and socket buffers fill up
            publisher.send(sent, codec.encode({"i": sent, "blob": blob}), time.monotonic() + 0.5)
            sent += 1
    assert caught.value.missing == (1,) and 8 <= sent < 10_000
    for i in range(sent):  # nothing was dropped
        assert codec.decode(subscriber.read(_soon()))["i"] == i
    publisher.send(sent, codec.encode("after"), _soon())  # and the writer can go on
    assert codec.decode(subscriber.read(_soon())) == "after"


def test_waiting_for_subscriptions_names_the_readers_that_never_came():
    publisher = Publisher(SECRET, "127.0.0.1", [1, 2, 3], hwm=4)
    subscriber = Subscriber(SECRET, publisher.endpoint, 2, 0, max_message=1 << 16, hwm=4)
    try:
        with pytest.raises(DistribTimeoutError, match=r"ranks 1, 3 did not subscribe") as caught:
            publisher.wait_subscribed(time.monotonic() + 1.0)
        assert caught.value.missing == (1, 3)
    finally:
        subscriber.close()
        publisher.close(None, 0)


# -- a process at the other end killed --------------------------------------------------

_BIG = 1 << 20  # bytes per message: a few of them fill the high-water marks and socket buffers


def _writer_killed_mid_message(conn) -> None:
    publisher = Publisher(SECRET, "127.0.0.1", [1], hwm=2)
    conn.send(publisher.endpoint)
    publisher.wait_subscribed(_soon())
    for i in range(1000):  # blocks once the reader's queue and the sockets are full
        publisher.send(i, bytes([i % 251]) * _BIG, _soon(60))
        if i == 8:
            conn.send("streaming")


def test_a_writer_killed_mid_message_delivers_only_whole_messages_then_the_reader_raises():
    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe()
    process = fork.Process(target=_writer_killed_mid_message, args=(child,))
    process.start()
    subscriber = Subscriber(SECRET, parent.recv(), 1, 0, max_message=2 * _BIG, hwm=2)
    try:
        assert parent.poll(30) and parent.recv() == "streaming"
        time.sleep(0.3)  # the writer is blocked in the middle of a message the reader has not taken
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        received = 0
        started = time.monotonic()
        with pytest.raises(CoordinatorError, match=r"connection to the writer \(rank 0, .*ended without"):
            while True:
                data = subscriber.read(_soon(30))
                assert bytes(data) == bytes([received % 251]) * _BIG  # whole, and in order
                received += 1
        assert 1 <= received < 1000 and time.monotonic() - started < 5  # what it queued last died with it
    finally:
        subscriber.close()
        if process.is_alive():
            process.kill()


def _reader(conn, endpoint: str, rank: int, close_after: int) -> None:
    subscriber = Subscriber(SECRET, endpoint, rank, 0, max_message=1 << 16, hwm=4)
    conn.send("subscribed")
    for _ in range(close_after):
        subscriber.read(_soon())
    if close_after:
        subscriber.close()
        conn.send("closed")
    time.sleep(60)  # until killed


@pytest.mark.parametrize("closes", [False, True], ids=["killed", "closed"])
def test_a_reader_killed_makes_the_writer_raise_naming_it_and_one_that_closed_does_not(closes):
    publisher = Publisher(SECRET, "127.0.0.1", [1, 2], hwm=4)
    fork = multiprocessing.get_context("fork")
    readers = []
    try:
        for rank in (1, 2):
            parent, child = fork.Pipe()
            process = fork.Process(target=_reader, args=(child, publisher.endpoint, rank,
                                                         1 if rank == 2 and closes else 0))
            process.start()
            assert parent.poll(30) and parent.recv() == "subscribed"
            readers.append((process, parent))
        publisher.wait_subscribed(_soon())
        publisher.send(0, codec.encode("hello"), _soon())
        process, conn = readers[1]  # rank 2
        if closes:
            assert conn.poll(30) and conn.recv() == "closed"
        else:
            os.kill(process.pid, signal.SIGKILL)
        process.join(10) if not closes else None
        started, seq = time.monotonic(), 1
        if closes:
            while time.monotonic() - started < 1.0:  # long enough for a loss to be noticed
                publisher.send(seq, codec.encode(seq), _soon())
                seq += 1
                time.sleep(0.01)
        else:
            with pytest.raises(CoordinatorError, match=r"remote reader rank 2 ended without"):
                while time.monotonic() - started < 10:
                    publisher.send(seq, codec.encode(seq), _soon())
                    seq += 1
                    time.sleep(0.01)
            assert time.monotonic() - started < 5
    finally:
        for process, _ in readers:
            process.kill()
            process.join(10)
        publisher.close(None, 0)
