"""The zmq side of the channel on its own, in one process: bad frames, gaps, back-pressure."""
from __future__ import annotations

import logging
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


def test_an_oversized_frame_is_refused_logged_and_the_reader_times_out_naming_the_writer(link, caplog):
    publisher, subscriber = link
    caplog.set_level(logging.WARNING, logger="distrib.control")
    publisher.send(0, b"\x00" * (1 << 17), _soon())  # over the reader's 64 KiB limit
    started = time.monotonic()
    with pytest.raises(DistribTimeoutError, match=r"writer \(rank 0\)") as caught:
        subscriber.read(time.monotonic() + 1.0)
    assert caught.value.missing == (0,) and time.monotonic() - started < 5
    assert any("was dropped: a frame over the size limit" in r.getMessage() for r in caplog.records)


def test_a_reader_that_does_not_read_holds_the_writer_back_until_the_timeout(link):
    publisher, subscriber = link
    blob = b"z" * 60_000
    sent = 0
    with pytest.raises(DistribTimeoutError, match=r"remote reader ranks 1") as caught:
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
