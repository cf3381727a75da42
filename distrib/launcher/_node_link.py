"""How the launchers of a launch on several nodes see a lost node within seconds.

Each node's launcher keeps one TCP connection to node 0's (a star). A
connection's loss is seen at once: a launcher that is SIGKILLed, or whose host
reboots cleanly, has its sockets closed by the kernel, and the peer reads the
end of the stream (zmq, built to reconnect, would hide exactly that). A node
that goes silent without closing anything (SIGSTOP, a hung host, a network
partition) is noticed when no byte has come for ``silence`` seconds: each side
sends one byte a second. A launcher that ends normally says so first (a
closing byte), so its end is not a loss.

Connections are authenticated: node 0 sends a fresh nonce, the node answers
with its number and an HMAC of the nonce under the launch secret, and node 0
answers likewise; a peer without the secret is dropped, so nobody can keep a
lost node looking alive. Nothing secret crosses the wire.

Node 0 learns of every loss first-hand and publishes it in the rendezvous
store (signed); the other nodes read it there, or see node 0's own
connection end.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Optional

__all__ = ["LinkServer", "LinkClient", "BEAT_INTERVAL"]

logger = logging.getLogger("distrib.launcher")

BEAT_INTERVAL = 1.0  # seconds between the bytes each side sends
_BEAT, _CLOSING = b".", b"F"
_NONCE = 16
_HANDSHAKE_TIMEOUT = 10.0  # a node's wait for node 0's answers
_ACCEPT_TIMEOUT = 2.0      # node 0's wait for a node's answer (its beats to the others wait meanwhile)


def _proof(secret: str, nonce: bytes, who: str) -> bytes:
    return hmac.new(secret.encode(), b"distrib node link\0" + nonce + who.encode(), hashlib.sha256).digest()


class _Peer:
    def __init__(self, sock: socket.socket, node: int):
        self.sock, self.node = sock, node
        self.last = time.monotonic()
        self.closing = False


class LinkServer:
    """Node 0's end: accepts one connection per other node; :meth:`lost` says who is gone and why.

    ``silence``: seconds without a byte after which a node counts as lost. A
    node that never connects is the rendezvous's business, not the link's.
    """

    def __init__(self, secret: str, host: str, advertise: str, nnodes: int, silence: float):
        """Listens on ``host`` (an address of this host); other nodes reach it at ``advertise``."""
        self._secret, self._nnodes, self._silence = secret, nnodes, silence
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(max(8, nnodes))
        port = self._listener.getsockname()[1]
        self.endpoint = f"[{advertise}]:{port}" if ":" in advertise else f"{advertise}:{port}"
        self._peers: dict[int, _Peer] = {}
        self._joined: list[_Peer] = []  # handshakes done, not yet in the selector
        self._lost: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrib-node-link", daemon=True)
        self._thread.start()

    def lost(self) -> dict[int, str]:
        """Nodes lost so far: node -> why."""
        with self._lock:
            return dict(self._lost)

    def connected(self) -> list[int]:
        with self._lock:
            return sorted(self._peers)

    def close(self) -> None:
        """Say this launcher is done to every node, then close."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        with self._lock:
            peers, self._peers = list(self._peers.values()) + self._joined, {}
            self._joined = []
        for peer in peers:
            _send_quietly(peer.sock, _CLOSING)
            peer.sock.close()
        self._listener.close()

    # -- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(selector, key.data)
                self._register_joined(selector)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT_INTERVAL
                    for peer in self._snapshot():
                        if not _send_quietly(peer.sock, _BEAT):
                            self._lose(selector, peer, "its connection broke")
                for peer in self._snapshot():
                    if now - peer.last > self._silence:
                        self._lose(selector, peer, _silent(self._silence))
        except Exception:  # noqa: BLE001 — a broken link thread must not take the launcher down
            logger.exception("distrib-run: the node link stopped")
        finally:
            selector.close()

    def _snapshot(self) -> list[_Peer]:
        with self._lock:
            return list(self._peers.values())

    def _accept(self) -> None:
        """Take a connection; its handshake runs on a thread of its own, so beats never wait for it."""
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        threading.Thread(target=self._greet, args=(sock,), name="distrib-node-link-handshake",
                         daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        node = self._handshake(sock)
        if node is None:
            sock.close()
            return
        sock.setblocking(False)
        with self._lock:
            self._joined.append(_Peer(sock, node))

    def _register_joined(self, selector) -> None:
        """Peers whose handshake finished start to count (a node's second connection replaces its first)."""
        with self._lock:
            joined, self._joined = self._joined, []
        for peer in joined:
            with self._lock:
                old = self._peers.pop(peer.node, None)
                self._peers[peer.node] = peer
            if old is not None:
                _unregister(selector, old.sock)
                old.sock.close()
            selector.register(peer.sock, selectors.EVENT_READ, peer)

    def _handshake(self, sock: socket.socket) -> Optional[int]:
        """Node 0's half: a nonce out, ``node + HMAC`` back, node 0's own HMAC out."""
        try:
            sock.settimeout(_ACCEPT_TIMEOUT)
            nonce = os.urandom(_NONCE)
            sock.sendall(nonce)
            answer = _recv_exactly(sock, 4 + 32)
            node = struct.unpack("!I", answer[:4])[0]
            if not 0 < node < self._nnodes or not hmac.compare_digest(
                    answer[4:], _proof(self._secret, nonce, f"node {node}")):
                logger.warning("distrib-run: refused a node-link connection that does not hold this "
                               "launch's secret")
                return None
            sock.sendall(_proof(self._secret, nonce, "node 0"))
            return node
        except (OSError, ValueError, struct.error):
            return None

    def _read(self, selector, peer: _Peer) -> None:
        data = _receive(peer.sock)
        if data is None:
            return
        if not data:
            if peer.closing:
                self._forget(selector, peer)
            else:
                self._lose(selector, peer, _CLOSED)
            return
        peer.last = time.monotonic()
        if _CLOSING in data:
            peer.closing = True

    def _lose(self, selector, peer: _Peer, why: str) -> None:
        with self._lock:
            if self._peers.get(peer.node) is not peer:
                return
            del self._peers[peer.node]
            if not peer.closing:
                self._lost.setdefault(peer.node, why)
        _unregister(selector, peer.sock)
        peer.sock.close()

    def _forget(self, selector, peer: _Peer) -> None:
        with self._lock:
            if self._peers.get(peer.node) is peer:
                del self._peers[peer.node]
        _unregister(selector, peer.sock)
        peer.sock.close()


class LinkClient:
    """A node's end: connects to node 0's :class:`LinkServer`; :meth:`lost` says if node 0 is gone."""

    def __init__(self, secret: str, endpoint: str, node: int, silence: float):
        host, _, port = endpoint.rpartition(":")
        self._silence = silence
        self._lost: Optional[str] = None
        self._closing = False
        self._stop = threading.Event()
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=_HANDSHAKE_TIMEOUT)
        try:
            nonce = _recv_exactly(sock, _NONCE)
            sock.sendall(struct.pack("!I", node) + _proof(secret, nonce, f"node {node}"))
            answer = _recv_exactly(sock, 32)
        except OSError as exc:
            sock.close()
            raise ConnectionError(f"node 0's launcher closed the node link during its handshake ({exc}): "
                                  "it does not hold this node's secret") from exc
        if not hmac.compare_digest(answer, _proof(secret, nonce, "node 0")):
            sock.close()
            raise ConnectionError("node 0's launcher answered the node link without this node's secret")
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="distrib-node-link", daemon=True)
        self._thread.start()

    def lost(self) -> Optional[str]:
        """Why node 0 is lost, or None."""
        return self._lost

    def close(self) -> None:
        """Say this launcher is done, then close."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        _send_quietly(self._sock, _CLOSING)
        self._sock.close()

    def _run(self) -> None:
        last, next_beat = time.monotonic(), 0.0
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set() and self._lost is None:
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT_INTERVAL
                    if not _send_quietly(self._sock, _BEAT):
                        self._lost = "its connection broke"
                        break
                if selector.select(timeout=0.05):
                    data = _receive(self._sock)
                    if data is None:
                        continue
                    if not data:
                        if not self._closing:
                            self._lost = _CLOSED
                        break
                    last = time.monotonic()
                    self._closing = self._closing or _CLOSING in data
                elif time.monotonic() - last > self._silence:
                    self._lost = _silent(self._silence)
        except Exception:  # noqa: BLE001 — a broken link thread must not take the launcher down
            logger.exception("distrib-run: the node link stopped")
        finally:
            selector.close()


_CLOSED = "its distrib-run's connection closed (it was killed, or its host went down)"


def _silent(silence: float) -> str:
    return f"it sent nothing for {silence:g}s (stopped, hung, or cut off from this host)"


def _receive(sock: socket.socket) -> Optional[bytes]:
    """What came (b"": the connection ended), or None if nothing after all."""
    try:
        return sock.recv(4096)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed")
        data += chunk
    return data


def _send_quietly(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.send(data)
        return True
    except (BlockingIOError, InterruptedError):
        return True  # a full buffer: the peer is slow, which silence judges
    except OSError:
        return False


def _unregister(selector, sock: socket.socket) -> None:
    try:
        selector.unregister(sock)
    except (KeyError, ValueError):
        pass
