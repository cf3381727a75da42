"""Control sockets admit only holders of the launch's secret, and survive what rogues send.

The launcher's monitor (a CURVE ROUTER) is the target: a wrong secret, no
secret, garbage bytes, replayed traffic and a 1 GB length header get nothing
in; malformed messages from an authenticated peer are dropped with a log
line; legitimate ranks keep working throughout.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import threading
import time

import msgpack
import pytest
import zmq

from distrib.control import codec
from distrib.control._security import client_socket, curve_keys
from distrib.control.agent import _Agent
from distrib.control.monitor import MAX_MESSAGE, Monitor
from distrib.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

SECRET = "launch-secret-for-tests"


@pytest.fixture
def monitor():
    mon = Monitor(SECRET)
    mon.watch(0, os.getpid(), None)
    mon.watch(1, 12345, None)
    yield mon
    mon.close()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _address(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def _hello(rank: int = 0, pid: int = None) -> bytes:
    return codec.encode({"t": "hello", "rank": rank, "host": "h", "pid": os.getpid() if pid is None else pid})


def _pump(mon: Monitor, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        mon.poll(0.05)


def _legit_client_works(mon: Monitor, context, rank: int = 0) -> None:
    """A client with the secret says hello and is welcomed."""
    sock = client_socket(context, zmq.DEALER, SECRET, max_message=MAX_MESSAGE)
    try:
        sock.connect(mon.endpoint)
        sock.send(_hello(rank))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not sock.poll(0):
            mon.poll(0.05)
        assert sock.poll(1000), "the monitor did not answer a client holding the secret"
        assert codec.decode(sock.recv()) == {"t": "welcome"}
        assert mon.host_of(rank) == "h"
    finally:
        sock.close(0)


def test_keys_come_from_the_secret_and_a_missing_secret_is_a_clear_error():
    assert curve_keys("a", "server") == curve_keys("a", "server")
    assert curve_keys("a", "server") != curve_keys("b", "server")
    assert curve_keys("a", "server") != curve_keys("a", "client")
    with pytest.raises(ConfigError, match="DISTRIB_SECRET"):
        curve_keys("", "client")


def test_the_monitor_listens_on_loopback_only(monitor):
    assert _address(monitor.endpoint)[0] == "127.0.0.1"


@pytest.mark.parametrize("rogue", ["wrong secret", "no secret"])
def test_a_client_without_the_secret_cannot_join_or_inject(monitor, context, rogue):
    if rogue == "wrong secret":
        sock = client_socket(context, zmq.DEALER, "guessed-secret", max_message=MAX_MESSAGE)
    else:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
    sock.connect(monitor.endpoint)
    sock.send(_hello(0))
    sock.send(codec.encode({"t": "stuck", "rank": 0, "what": "barrier", "id": 1}))
    _pump(monitor, 1.0)
    assert monitor.received == 0 and monitor.host_of(0) == ""
    assert monitor.stuck() == []
    assert not sock.poll(100)  # and it hears nothing back
    sock.close(0)
    _legit_client_works(monitor, context)


def _raw(endpoint: str, payload: bytes) -> socket.socket:
    conn = socket.create_connection(_address(endpoint), timeout=5)
    try:
        conn.sendall(payload)
    except OSError:
        pass  # the server may already have hung up: that is the point
    return conn


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting (64 bytes)."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def test_garbage_bytes_do_not_disturb_the_monitor(monitor, context):
    conns = [_raw(monitor.endpoint, os.urandom(4096)),
             _raw(monitor.endpoint, _greeting(b"NULL") + b"\x00\x05hello"),
             _raw(monitor.endpoint, _greeting(b"CURVE") + b"\x04\x05HELLO" + os.urandom(200)),
             _raw(monitor.endpoint, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")]
    _pump(monitor, 1.0)
    assert monitor.received == 0
    _legit_client_works(monitor, context)
    for conn in conns:
        conn.close()


def test_a_1gb_length_header_is_refused_without_allocating_it(monitor, context):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    huge = struct.pack(">BQ", 0x06, 1 << 30)  # a long command frame of 1 GiB
    conns = [_raw(monitor.endpoint, _greeting(b"CURVE") + huge + b"\x00" * 1024),
             _raw(monitor.endpoint, _greeting(b"NULL") + struct.pack(">BQ", 0x02, 1 << 30) + b"\x00" * 1024)]
    _pump(monitor, 1.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 200 * 1024, f"memory grew by {(after - before) // 1024} MiB"
    assert monitor.received == 0
    _legit_client_works(monitor, context)
    for conn in conns:
        conn.close()


def test_an_authenticated_but_oversized_message_is_refused(monitor, context):
    sock = client_socket(context, zmq.DEALER, SECRET, max_message=MAX_MESSAGE)
    sock.connect(monitor.endpoint)
    sock.send(b"\x00" * (MAX_MESSAGE + 1))
    _pump(monitor, 1.0)
    assert monitor.received == 0
    sock.close(0)
    _legit_client_works(monitor, context)


class _RecordingProxy:
    """Forwards one TCP connection to ``target`` and records what the client sent."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        stop = threading.Event()

        def pipe(src, dst, record):
            while not stop.is_set():
                try:
                    data = src.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                if record:
                    self.sent += data
                try:
                    dst.sendall(data)
                except OSError:
                    break
            stop.set()

        back = threading.Thread(target=pipe, args=(server, client, False), daemon=True)
        back.start()
        pipe(client, server, True)
        for s in (client, server):
            s.close()


def test_replayed_traffic_is_rejected(monitor, context):
    proxy = _RecordingProxy(_address(monitor.endpoint))
    sock = client_socket(context, zmq.DEALER, SECRET, max_message=MAX_MESSAGE)
    sock.connect(f"tcp://127.0.0.1:{proxy.port}")
    sock.send(_hello(0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sock.poll(0):
        monitor.poll(0.05)
    assert sock.poll(1000) and codec.decode(sock.recv()) == {"t": "welcome"}
    sock.send(codec.encode({"t": "stuck", "rank": 0, "what": "barrier", "id": 7}))
    _pump(monitor, 0.5)
    monitor.release_stuck()
    sock.close(0)
    proxy.thread.join(timeout=5)
    assert len(proxy.sent) > 64, "the proxy recorded no handshake"
    seen = monitor.received
    replay = _raw(monitor.endpoint, bytes(proxy.sent))
    _pump(monitor, 1.5)
    replay.close()
    assert monitor.received == seen, "a replayed connection delivered a message"
    assert monitor.stuck() == []


def test_malformed_messages_from_an_authenticated_peer_are_dropped_and_logged(monitor, context, caplog):
    caplog.set_level(logging.WARNING, logger="distrib.control")
    sock = client_socket(context, zmq.DEALER, SECRET, max_message=MAX_MESSAGE)
    sock.connect(monitor.endpoint)
    bad = [
        b"",                                              # empty
        b"\xc1",                                          # never-used msgpack byte
        codec.encode({"t": "hello", "rank": 0})[:-3],     # truncated
        codec.encode([1, 2, 3]),                          # not a map
        codec.encode({"t": "beat"}),                      # no rank
        codec.encode({"t": "beat", "rank": 0}),           # before hello
        codec.encode({"t": "hello", "rank": 0, "host": "h", "pid": 1}),   # another process's rank
        codec.encode({"t": "hello", "rank": 9, "host": "h", "pid": 1}),   # not a worker here
        b"\x91" * 100_000 + b"\x00",                      # nesting bomb
        b"\xdd\xff\xff\xff\xff",                          # declares 4 G elements
    ]
    for data in bad:
        sock.send(data)
    sock.send_multipart([b"a", b"b", b"c"])               # wrong frame count
    _pump(monitor, 1.0)
    assert monitor.received == len(bad) + 1
    assert monitor.dropped == len(bad) + 1
    assert monitor.host_of(0) == "" and monitor.host_of(9) == ""
    # After a valid hello, a malformed request still cannot pass for another rank.
    sock.send(_hello(0))
    sock.send(codec.encode({"t": "stacks", "id": 1, "rank": 1, "host": "h", "pid": 1, "threads": []}))
    sock.send(codec.encode({"t": "stuck", "rank": 0, "what": 5, "id": "x"}))
    sock.send(codec.encode({"t": "mystery", "rank": 0}))
    _pump(monitor, 1.0)
    assert monitor.dropped == len(bad) + 4
    assert monitor.stuck() == []
    assert sum("dropped" in r.getMessage() for r in caplog.records) == monitor.dropped
    sock.close(0)
    _legit_client_works(monitor, context)


def test_the_agent_drops_malformed_requests_from_its_launcher(caplog):
    caplog.set_level(logging.WARNING, logger="distrib.control")

    class FakeSocket:
        def __init__(self):
            self.sent = []

        def send(self, data, flags=0):
            self.sent.append(data)

    agent = _Agent.__new__(_Agent)  # no thread: only the message handling
    agent.rank, agent.host = 3, "h"
    agent.connected = threading.Event()
    sock = FakeSocket()
    for data in (b"\xc1", codec.encode("dump"), codec.encode({"t": "nope"}), msgpack.packb({"x": 1})):
        agent._handle(sock, data, {})
    assert sock.sent == [] and len(caplog.records) == 4
    # As in the agent's own thread: the snapshot leaves that thread out and shows the main one.
    worker = threading.Thread(target=agent._handle, args=(sock, codec.encode({"t": "dump", "id": 4}), {}))
    worker.start()
    worker.join()
    reply = codec.decode(sock.sent[0])
    assert reply["t"] == "stacks" and reply["id"] == 4 and reply["rank"] == 3
    main = [t for t in reply["threads"] if t["main"]]
    assert main and any(f[2] == "test_the_agent_drops_malformed_requests_from_its_launcher"
                        for f in main[0]["frames"])
