"""Authenticated zmq sockets: CURVE keys derived from the launch's secret.

Every zmq socket distrib opens is made here. Both key pairs of a launch (one
for servers, one for clients) are derived from ``DISTRIB_SECRET`` with HMAC,
so every process of the launch knows them and no other process can:

- a server accepts a client only if the client proves it holds the client
  secret key (a ZAP handler checks the client's public key), and a client
  finishes the handshake only with a server holding the server secret key;
- traffic is encrypted and authenticated per message by CurveZMQ, with
  per-connection nonces: a frame captured on the wire cannot be read,
  altered, or replayed into another connection;
- a peer that speaks no CURVE, the wrong keys, or garbage is dropped by
  libzmq during the handshake, before any byte reaches our code.

Sockets are bound to the launch's address (never all interfaces unless
``DISTRIB_BIND_ADDR`` asks), carry a maximum message size, and never linger
on close. Each server owns its zmq context and ZAP thread, so servers built
for different launches in one process do not share keys.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Optional

from ..errors import ConfigError

__all__ = ["SecureServer", "client_socket", "curve_keys", "bind_address", "BIND_ADDR_VAR"]

logger = logging.getLogger("distrib.control")

BIND_ADDR_VAR = "DISTRIB_BIND_ADDR"  # an address to bind servers to instead of the launch's
_ZAP_DOMAIN = "distrib"
# libzmq applies MAXMSGSIZE to the CURVE handshake's commands too (some ~300
# bytes): a smaller limit silently fails every handshake.
MIN_MAX_MESSAGE = 1024


def curve_keys(secret: str, role: str) -> tuple[bytes, bytes]:
    """The launch's CURVE key pair for ``role`` ("server" or "client"): (public, secret), Z85."""
    import zmq
    from zmq.utils import z85

    if not secret:
        raise ConfigError("this process has no launch secret (DISTRIB_SECRET); control sockets "
                          "need one. Start it with distrib-run or distrib.launch, or set "
                          "DISTRIB_SECRET to the same random value in every process of the launch")
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    raw = hmac.new(secret.encode(), f"distrib curve {role} key".encode(), hashlib.sha256).digest()
    secret_key = z85.encode(raw)
    return zmq.curve_public(secret_key), secret_key


def bind_address(default: str) -> str:
    """The address servers bind to: ``DISTRIB_BIND_ADDR`` if set, else ``default``."""
    return os.environ.get(BIND_ADDR_VAR) or default


class _ClientKey:
    """ZAP credentials provider: admit exactly the launch's client key."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = hmac.compare_digest(key, self.public)
        if not allowed:
            logger.warning("refused a control connection that does not hold this launch's secret")
        return allowed


class SecureServer:
    """A zmq context whose server sockets admit only clients holding the launch's secret.

    Use :meth:`socket` to make bound sockets; :meth:`close` closes them all and
    stops the ZAP thread.
    """

    def __init__(self, secret: str):
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        self._zmq = zmq
        self._public, self._secret = curve_keys(secret, "server")
        self._client_public, _ = curve_keys(secret, "client")
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("distrib.control.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(_ZAP_DOMAIN, _ClientKey(self._client_public))
        self._sockets: list = []
        self._closed = False

    def socket(self, kind: int, host: str, *, max_message: int, port: Optional[int] = None):
        """A CURVE server socket bound to ``host`` (a random free port unless ``port``).

        Returns ``(socket, endpoint)``; the endpoint is what clients connect to.
        Incoming messages over ``max_message`` bytes (at least
        :data:`MIN_MAX_MESSAGE`) drop the connection.
        """
        zmq = self._zmq
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(int(max_message), MIN_MAX_MESSAGE))
        sock.curve_server = True
        sock.curve_publickey = self._public
        sock.curve_secretkey = self._secret
        sock.zap_domain = _ZAP_DOMAIN.encode()
        if ":" in host:
            sock.ipv6 = True
        try:
            if port is None:
                sock.bind(f"tcp://{_bracket(host)}:0")
            else:
                sock.bind(f"tcp://{_bracket(host)}:{port}")
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"could not bind a control socket to {host}: {exc}. Set "
                              f"{BIND_ADDR_VAR} to an address of this host") from exc
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sockets.append(sock)
        return sock, endpoint

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            sock.close(0)
        self._auth.stop()
        self.context.term()


def client_socket(context, kind: int, secret: str, *, max_message: int):
    """A CURVE client socket of ``kind`` on ``context`` (connect it yourself)."""
    import zmq

    server_public, _ = curve_keys(secret, "server")
    public, secret_key = curve_keys(secret, "client")
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max(int(max_message), MIN_MAX_MESSAGE))
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret_key
    return sock


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
