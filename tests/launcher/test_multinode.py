"""Several nodes on one host (loopback): nodes wait for each other, within a bound."""
from __future__ import annotations

import re
import time

import pytest

from .conftest import free_port, run_cli, script, start_cli

pytestmark = pytest.mark.timeout(120)


def _node_args(node_rank: int, port: int, *extra: str) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), *extra]


def test_node_0_alone_times_out_naming_the_missing_node():
    started = time.monotonic()
    result = run_cli(*_node_args(0, free_port(), "--rdzv-timeout", "3"), script("hello.py"))
    assert result.returncode == 1
    assert "node 1 never joined (joined: 0)" in result.stderr
    assert time.monotonic() - started < 30  # the rendezvous timeout, not a linger after it
    assert " hello " not in result.stdout  # no worker started


def test_node_1_alone_times_out_naming_node_0():
    result = run_cli(*_node_args(1, free_port(), "--rdzv-timeout", "3"), script("hello.py"))
    assert result.returncode == 1
    assert "could not reach node 0's rendezvous store" in result.stderr
    assert "missing: node 0" in result.stderr


def test_nodes_arriving_at_different_times_wait_for_each_other():
    port = free_port()
    late_node = start_cli(*_node_args(1, port, "--nprocs", "2", "--rdzv-timeout", "60"), script("hello.py"))
    try:
        time.sleep(2)  # node 1 is up and waiting before node 0 starts
        assert late_node.poll() is None
        first = run_cli(*_node_args(0, port, "--nprocs", "1", "--rdzv-timeout", "60"), script("hello.py"))
        out, err = late_node.communicate(timeout=60)
    finally:
        if late_node.poll() is None:
            late_node.kill()
    assert first.returncode == 0, first.stderr
    assert late_node.returncode == 0, err
    # 1 process on node 0 and 2 on node 1: global ranks continue across nodes.
    assert re.findall(r"^\[(\d)\] hello RANK=(\d) WORLD_SIZE=3 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 "
                      r"NODE_RANK=0 NNODES=2", first.stdout, re.M) == [("0", "0")]
    node1 = sorted(re.findall(r"^\[(\d)\] hello RANK=\d WORLD_SIZE=3 LOCAL_RANK=(\d) "
                              r"LOCAL_WORLD_SIZE=2 NODE_RANK=1 NNODES=2", out, re.M))
    assert node1 == [("1", "0"), ("2", "1")]
    launch_ids = set(re.findall(r"DISTRIB_LAUNCH_ID=(\S+)", first.stdout + out))
    assert launch_ids == {f"127.0.0.1:{port}"}


def _two_nodes(port: int, *args: str):
    return [start_cli(*_node_args(k, port, "--nprocs", "2", "--rdzv-timeout", "60"), *args) for k in (0, 1)]


def test_sigusr1_to_node_0_reports_every_rank_of_every_node(tmp_path):
    import signal

    from .conftest import wait_for

    nodes = _two_nodes(free_port(), script("stuck.py"), "sleep", "8", str(tmp_path))
    try:
        wait_for(lambda: len(list(tmp_path.glob("*.ready"))) == 4, 60, "every rank to be in place")
        nodes[0].send_signal(signal.SIGUSR1)
        outputs = [node.communicate(timeout=60) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    first, second = outputs[0][1], outputs[1][1]
    assert "distrib-run: stack dump requested (SIGUSR1). Where each rank is:" in first
    # One screen on node 0 for the ranks of both nodes.
    assert re.search(r"distrib-run:   ranks 0-3\s+in its own code\s+stuck.py:\d+ in nap", first), first
    assert ("distrib-run: node 0 asked where every rank is (stack dump requested (SIGUSR1)); sent "
            "this node's ranks (2-3) for its report") in second


def test_a_timeout_seen_on_both_nodes_gives_one_report_of_every_rank():
    nodes = _two_nodes(free_port(), script("stuck.py"), "coordinator")
    try:
        outputs = [node.communicate(timeout=90) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode != 0 for node in nodes)
    both = outputs[0][1] + outputs[1][1]
    reports = re.findall(r"distrib-run: barrier timed out on rank \d.*Where each rank is:", both)
    assert len(reports) == 1, both  # not one per node, though ranks of both nodes timed out
    assert re.search(r"distrib-run:   ranks 0, 2-3\s+in barrier\s+stuck.py:\d+", both), both
    assert re.search(r"distrib-run:   rank 1\s+in all_gather\s+stuck.py:\d+", both), both
