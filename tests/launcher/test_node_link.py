"""The node link on its own: authentication, a closed connection, silence, a clean end."""
from __future__ import annotations

import os
import socket
import time

import pytest

from distrib.launcher._node_link import LinkClient, LinkServer

from .conftest import wait_for

SECRET = "a" * 32


@pytest.fixture
def server():
    link = LinkServer(SECRET, "127.0.0.1", "127.0.0.1", nnodes=3, silence=2.0)
    yield link
    link.close()


def test_a_node_with_the_secret_joins_and_a_clean_close_is_not_a_loss(server):
    client = LinkClient(SECRET, server.endpoint, 1, silence=2.0)
    wait_for(lambda: server.connected() == [1], 5, "node 1 to be connected")
    time.sleep(2.5)  # longer than the silence: the beats keep both alive
    assert server.lost() == {} and client.lost() is None
    client.close()
    wait_for(lambda: server.connected() == [], 5, "node 1 to be gone")
    assert server.lost() == {}


def test_a_node_without_the_secret_is_refused_and_told_so(server):
    with pytest.raises(ConnectionError, match="secret"):
        LinkClient("b" * 32, server.endpoint, 1, silence=2.0)
    assert server.connected() == [] and server.lost() == {}


def test_a_node_number_outside_the_launch_is_refused(server):
    with pytest.raises(ConnectionError):
        LinkClient(SECRET, server.endpoint, 3, silence=2.0)


def test_a_stranger_that_connects_and_says_nothing_does_not_stall_the_others(server):
    client = LinkClient(SECRET, server.endpoint, 1, silence=2.0)
    host, _, port = server.endpoint.rpartition(":")
    strangers = [socket.create_connection((host, int(port))) for _ in range(3)]
    time.sleep(4.0)  # node 0 drops each after its handshake timeout; the beats go on
    assert client.lost() is None and server.lost() == {} and server.connected() == [1]
    for s in strangers:
        s.close()
    client.close()


def test_a_closed_connection_is_a_loss_at_once_on_both_sides(server):
    client = LinkClient(SECRET, server.endpoint, 2, silence=2.0)
    wait_for(lambda: server.connected() == [2], 5, "node 2 to be connected")
    os.close(os.dup(client._sock.fileno()))  # keep the fd number alive for the shutdown below
    client._sock.shutdown(socket.SHUT_RDWR)  # as the kernel does for a killed process
    wait_for(lambda: 2 in server.lost(), 2, "node 0 to see node 2 lost")
    assert "connection closed" in server.lost()[2]


def test_silence_is_a_loss_after_the_bound():
    link = LinkServer(SECRET, "127.0.0.1", "127.0.0.1", nnodes=2, silence=1.5)
    try:
        host, _, port = link.endpoint.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        from distrib.launcher._node_link import _proof, _recv_exactly

        nonce = _recv_exactly(sock, 16)
        sock.sendall((1).to_bytes(4, "big") + _proof(SECRET, nonce, "node 1"))
        _recv_exactly(sock, 32)
        started = time.monotonic()  # a node that joined and then sends nothing (its socket open)
        wait_for(lambda: 1 in link.lost(), 5, "node 0 to see node 1 silent")
        assert 1.4 < time.monotonic() - started < 3.0
        assert "sent nothing for 1.5s" in link.lost()[1]
        sock.close()
    finally:
        link.close()
