"""The broadcast channel on real processes (distrib.launch): both transports, one node.

``shared_memory=False`` puts every reader on zmq, as if it were on another node;
tests/control/test_channel_nodes.py runs the real two-node case.
"""
from __future__ import annotations

import pytest

import distrib
from distrib.control.codec import TensorMeta

from . import channel_workers as workers

FAST = dict(start_method="forkserver", timeout=120, devices="cpu")
TRANSPORTS = [pytest.param(True, id="shm"), pytest.param(False, id="zmq")]


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_every_reader_gets_every_message_in_order_including_ones_larger_than_the_ring(shared_memory):
    # 4 KiB chunks x 4: messages up to 40 KiB and one of 5 MiB stream through the 16 KiB ring.
    src = 1  # not rank 0, so nothing assumes the writer is the master
    results = distrib.launch(workers.ordering, nprocs=3, args=(shared_memory, src, 4096, 4), **FAST)
    assert results[src] == {"transport": "writer", "echo": "last one"}
    for rank in (0, 2):
        out = results[rank]
        assert out["transport"] == ("shm" if shared_memory else "zmq")
        assert out["count"] == 121 and out["first_bad"] is None
        meta = TensorMeta("bfloat16", (3, 5), "cpu")
        assert out["meta"] == {"tensor": meta, "meta": meta, "shape": [3, 5]}  # tuples arrive as lists
        assert out["last"] == "last one"


def test_slow_reader_holds_the_writer_back_and_a_stopped_one_is_named_by_the_timeout():
    writer, fast, slow = distrib.launch(workers.back_pressure, nprocs=3, args=(2,), **FAST)
    assert fast["in_order"] and slow["in_order"]  # nothing lost, nothing reordered
    assert writer["blocked_for"] > 0.03 * (40 - 4) * 0.8  # it waited for the slow reader
    missing, message, sent = writer["timeout"]
    assert missing == [2] and sent == 4  # the ring's 4 chunks, then the wait that timed out
    assert "rank 2 to read" in message and "recv()" in message
    assert slow["drained"] == 4 and fast["drained"] == 0  # after the close, nothing more


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_timeouts_misuse_bad_objects_and_close(shared_memory):
    writer, *readers = distrib.launch(workers.semantics, nprocs=3, args=(shared_memory,), **FAST)
    assert writer["recv_on_writer"][0] == "CoordinatorError" and "only readers" in writer["recv_on_writer"][1]
    kind, message = writer["bad_object"]
    assert kind == "MessageError" and "cannot carry object" in message
    assert writer["send_after_close"][0] == "ChannelClosed"
    for out in readers:
        assert out["send_on_reader"][0] == "CoordinatorError"
        assert "only the writer (rank 0) sends" in out["send_on_reader"][1]
        kind, message = out["reader_timeout"]
        assert kind == "DistribTimeoutError" and "writer (rank 0)" in message
        assert out["reader_timeout_missing"] == [0]
        assert out["timeout_took"] < 5
        assert out["received"] == ["after the error", 0, 1, 2]  # the bad object sent nothing
        assert out["after_drain"][0] == "ChannelClosed" and "closed" in out["after_drain"][1]
        assert out["again"][0] == "ChannelClosed"
        assert out["recv_after_own_close"][0] == "ChannelClosed"


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_a_closed_reader_does_not_hold_the_writer_back(shared_memory):
    results = distrib.launch(workers.closed_reader_does_not_hold_the_writer, nprocs=3,
                             args=(shared_memory,), **FAST)
    assert results == ["sent", True, "closed"]


@pytest.mark.parametrize("kind, error, words", [
    ("no-shm", "CoordinatorError", ["writer (rank 0) could not set up", "shared-memory ring"]),
    ("reader-fails", "CoordinatorError", ["rank 2", "injected failure"]),
    ("bad-args", "ConfigError", ["rank 1", "chunks=1"]),
    ("bad-src", "ConfigError", ["src=3 is not a rank"]),
])
def test_a_failure_to_set_up_on_one_rank_raises_on_every_rank(kind, error, words):
    results = distrib.launch(workers.creation_failure, nprocs=3, args=(kind,), **FAST)
    for result in results:
        assert result is not None and result[0] == error, result
        for word in words:
            assert word in result[1]


def test_world_of_one_sends_to_nobody():
    (result,) = distrib.launch(workers.world_of_one, nprocs=1, **FAST)
    assert result == (True, [1, 2], (), ())


def test_sockets_without_the_launch_keys_get_nothing_from_the_writer():
    writer, *readers = distrib.launch(workers.rogue_subscribers, nprocs=3, **FAST)
    assert writer["endpoint"].startswith("tcp://127.0.0.1:")  # the launch's address, not 0.0.0.0
    assert writer["rogue_frames"] == {"wrong-secret": False, "foreign-client-key": False, "no-curve": False}
    for out in readers:
        assert out["got"] == list(range(50))
