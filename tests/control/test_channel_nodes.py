"""The broadcast channel across two nodes on one host (two distrib-run, loopback): readers on
the writer's node use shared memory, the others the zmq path."""
from __future__ import annotations

import json
import re

import pytest
from launcher.conftest import free_port, script, start_cli

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
    records = {}
    for out, _ in outputs:
        for line in re.findall(r"^\[\d\] RESULT (.*)$", out, re.M):
            record = json.loads(line)
            records[record["rank"]] = record
    assert sorted(records) == [0, 1, 2, 3]
    # node 0: ranks 0, 1; node 1: ranks 2, 3. Writer 0, then writer 3.
    expected = {0: ["writer", "zmq"], 1: ["shm", "zmq"], 2: ["zmq", "shm"], 3: ["zmq", "writer"]}
    for rank, record in records.items():
        assert [c["transport"] for c in record["channels"]] == expected[rank]
        assert all(c["ok"] for c in record["channels"]), record
        assert all(c["endpoint"].startswith("tcp://127.0.0.1:") for c in record["channels"])
