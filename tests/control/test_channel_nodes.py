"""The broadcast channel across two nodes on one host (two distrib-run, loopback): readers on
the writer's node use shared memory, the others the zmq path."""
from __future__ import annotations

import pytest
from launcher.conftest import CHANNEL_TRANSPORTS, channel_results, free_port, script, start_cli

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_readers_on_the_other_node_get_every_message_through_zmq():
    port = free_port()
    nodes = [start_cli("--nnodes", "2", "--node-rank", str(k), "--master-addr", "127.0.0.1",
                       "--master-port", str(port), "--nprocs", "2", "--rdzv-timeout", "60",
                       "--timeout", "90", "--show-ranks", "0-3", script("channel.py")) for k in (1, 0)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=100))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err
    records = channel_results(*(out for out, _ in outputs))
    assert sorted(records) == [0, 1, 2, 3]
    for rank, record in records.items():
        assert [c["transport"] for c in record["channels"]] == CHANNEL_TRANSPORTS[rank]
        assert all(c["ok"] for c in record["channels"]), record
        assert all(c["endpoint"].startswith("tcp://127.0.0.1:") for c in record["channels"])
