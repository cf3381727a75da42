"""Worker functions for the broadcast-channel tests (importable by spawned ranks).

Each returns plain data (what it observed), so the test process asserts on it.
"""
from __future__ import annotations

import random
import time

import distrib
from distrib.control import codec
from distrib.control.channel import BroadcastChannel, ChannelClosed
from distrib.control.codec import TensorMeta


def mixed_messages(count: int = 120) -> list:
    """Messages of mixed sizes and kinds: small, larger than a 4 KiB chunk, larger than a 16 KiB ring."""
    out = []
    for i in range(count):
        size = (i * 7919) % (40 << 10) if i % 3 else i  # 0 .. 40 KiB
        out.append({"i": i, "blob": bytes([i % 251]) * size, "text": f"message {i}",
                    "nested": {"list": [i, -i, 1.5, None, True], "pair": (i, "x")}})
    out.append({"i": count, "blob": random.Random(count).randbytes(5 << 20)})  # 5 MiB: many rings' worth
    return out


def expected_after_decode(messages: list) -> list:
    return [codec.decode(codec.encode(m)) for m in messages]


def ordering(shared_memory: bool, src: int, chunk_bytes: int, chunks: int):
    """``src`` sends mixed messages and tensors' metadata; readers check every one, in order."""
    import torch

    ctx = distrib.init()
    channel = BroadcastChannel.create(ctx.coordinator, src, chunk_bytes=chunk_bytes, chunks=chunks,
                                      timeout=60, shared_memory=shared_memory)
    messages = mixed_messages()
    tensor = torch.zeros(3, 5, dtype=torch.bfloat16)
    with channel:
        if channel.is_writer:
            for m in messages:
                channel.send(m)
            channel.send({"tensor": tensor, "meta": TensorMeta.of(tensor), "shape": tuple(tensor.shape)})
            echoed = channel.broadcast("last one")
            return {"transport": channel.transport, "echo": echoed}
        got = [channel.recv() for _ in range(len(messages))]
        meta = channel.recv()
        last = channel.broadcast()
    want = expected_after_decode(messages)
    first_bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
    return {"transport": channel.transport, "count": len(got), "first_bad": first_bad,
            "meta": meta, "last": last}


def back_pressure(slow_rank: int):
    """A slow reader holds the writer back without losing anything; then one that stops
    reading makes the writer's send time out, naming it."""
    ctx = distrib.init()
    coord = ctx.coordinator
    channel = coord.broadcast_channel(0, chunk_bytes=1024, chunks=4, timeout=30)
    count, blob = 40, b"x" * 700  # one chunk per message: the ring holds 4
    out: dict = {}
    if channel.is_writer:
        started = time.monotonic()
        for i in range(count):
            channel.send({"i": i, "blob": blob})
        out["blocked_for"] = time.monotonic() - started
    else:
        got = []
        for i in range(count):
            if coord.rank == slow_rank:
                time.sleep(0.03)
            got.append(channel.recv()["i"])
        out["in_order"] = got == list(range(count))
    coord.barrier()
    # Phase 2: the slow reader stops reading.
    if channel.is_writer:
        sent = 0
        try:
            for _ in range(10):
                channel.send({"i": "more"}, timeout=1.0)
                sent += 1
        except distrib.DistribTimeoutError as exc:
            out["timeout"] = (list(exc.missing), str(exc), sent)
        coord.barrier()
        channel.close()
    else:
        if coord.rank != slow_rank:
            for _ in range(4):  # what the ring held before the writer gave up
                channel.recv(timeout=10)
        coord.barrier()
        drained = 0
        try:
            while True:
                channel.recv(timeout=10)
                drained += 1
        except ChannelClosed:
            out["drained"] = drained
        channel.close()
    return out


def semantics(shared_memory: bool):
    """Timeouts, misuse, a non-encodable object, and close(), as each rank sees them."""
    ctx = distrib.init()
    coord = ctx.coordinator
    channel = BroadcastChannel.create(coord, 0, timeout=30, shared_memory=shared_memory)
    out: dict = {"repr": repr(channel)}
    if channel.is_writer:
        out["recv_on_writer"] = _error(channel.recv)
        out["bad_object"] = _error(lambda: channel.send({"x": object()}))
        coord.barrier()  # the readers time out meanwhile
        channel.send("after the error")
        for i in range(3):
            channel.send(i)
        channel.close()
        channel.close()  # idempotent
        out["send_after_close"] = _error(lambda: channel.send(1))
        return out
    out["send_on_reader"] = _error(lambda: channel.send(1))
    started = time.monotonic()
    out["reader_timeout"] = _error(lambda: channel.recv(timeout=0.5))
    out["reader_timeout_missing"] = _missing(lambda: channel.recv(timeout=0.2))
    out["timeout_took"] = time.monotonic() - started
    coord.barrier()
    out["received"] = [channel.recv() for _ in range(4)]
    out["after_drain"] = _error(channel.recv)
    out["again"] = _error(channel.recv)
    channel.close()
    out["recv_after_own_close"] = _error(channel.recv)
    return out


def closed_reader_does_not_hold_the_writer(shared_memory: bool):
    """Rank 2 closes at once; the writer sends far more than the ring holds, unhindered."""
    ctx = distrib.init()
    coord = ctx.coordinator
    channel = BroadcastChannel.create(coord, 0, chunk_bytes=1024, chunks=4, timeout=20,
                                      shared_memory=shared_memory)
    if coord.rank == 2:
        channel.close()
    coord.barrier()
    if channel.is_writer:
        for i in range(200):
            channel.send({"i": i, "blob": b"y" * 900}, timeout=10)
        channel.close()
        return "sent"
    if coord.rank == 2:
        return "closed"
    got = [channel.recv()["i"] for _ in range(200)]
    return got == list(range(200))


def creation_failure(kind: str):
    """Setting up fails on one rank; every rank must raise (never hang)."""
    from distrib.control import _shm_ring

    ctx = distrib.init()
    coord = ctx.coordinator
    try:
        if kind == "no-shm" and coord.rank == 0:
            _shm_ring.SHM_DIRS = ("/nonexistent-distrib-dir",)
        if kind == "reader-fails" and coord.rank == 2:
            _shm_ring.RingReader = _FailingReader
        if kind == "bad-args":
            coord.broadcast_channel(0, chunks=1 if coord.rank == 1 else 4, timeout=30)
        elif kind == "bad-src":
            coord.broadcast_channel(coord.world_size, timeout=30)
        else:
            coord.broadcast_channel(0, timeout=30)
    except distrib.DistribError as exc:
        coord.barrier()  # still in step: the coordinator works after the failure
        return type(exc).__name__, str(exc)
    return None


class _FailingReader:
    def __init__(self, *args, **kwargs):
        raise OSError("injected failure to open the ring")


def world_of_one():
    ctx = distrib.init()
    with ctx.coordinator.broadcast_channel() as channel:
        channel.send({"nobody": "listens"})
        return channel.is_writer, channel.broadcast([1, 2]), channel.local_readers, channel.remote_readers


def rogue_subscribers():
    """Sockets without the launch's keys connect to the writer's endpoint and get nothing."""
    import zmq

    from distrib.control._security import client_socket, curve_keys

    ctx = distrib.init()
    coord = ctx.coordinator
    channel = BroadcastChannel.create(coord, 0, timeout=30, shared_memory=False)
    out: dict = {}
    if channel.is_writer:
        context = zmq.Context()
        server_public, _ = curve_keys(ctx.info.secret, "server")
        own_public, own_secret = zmq.curve_keypair()
        rogues = {"wrong-secret": client_socket(context, zmq.SUB, "not the launch secret",
                                                max_message=1 << 20),
                  "foreign-client-key": context.socket(zmq.SUB), "no-curve": context.socket(zmq.SUB)}
        rogues["foreign-client-key"].curve_serverkey = server_public
        rogues["foreign-client-key"].curve_publickey = own_public
        rogues["foreign-client-key"].curve_secretkey = own_secret
        for sock in rogues.values():
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(channel.endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(0.5)  # they have tried their handshakes
    coord.barrier()
    if channel.is_writer:
        for i in range(50):
            channel.send({"i": i})
    else:
        out["got"] = [channel.recv()["i"] for _ in range(50)]
    coord.barrier()
    if channel.is_writer:
        time.sleep(0.3)
        out["rogue_frames"] = {name: sock.poll(100) != 0 for name, sock in rogues.items()}
        out["endpoint"] = channel.endpoint
        for sock in rogues.values():
            sock.close(0)
        context.term()
    channel.close()
    return out


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return type(exc).__name__, str(exc)
    return None


def _missing(call):
    try:
        call()
    except distrib.DistribTimeoutError as exc:
        return list(exc.missing)
    return None
