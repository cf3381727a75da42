"""Two nodes on one host (loopback): a lost node is named in seconds, and the rendezvous store
holds nothing secret and obeys nothing forged.

``python -m distrib.bench faults`` repeats the loss scenarios 20 times; here each runs a few times.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .conftest import alive, free_port, read_pids, run_cli, script, start_cli, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

REPEATS = 3
NODE_SILENCE = 8.0  # the default --heartbeat-timeout (5 s) + 3 s


def _node(node_rank: int, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    return start_cli("--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--nprocs", "2", "--rdzv-timeout", "60", "--grace", "2",
                     *args, env=env)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _start_hanging(tmp_path: Path, env: dict | None = None):
    port = free_port()
    nodes = [_node(k, port, script("hang_after_start.py"), str(tmp_path), env=env) for k in (0, 1)]
    try:
        wait_for(lambda: all((tmp_path / f"rank{r}.pids").exists() for r in range(4)), 120,
                 "all four ranks to start")
    except AssertionError:
        raise AssertionError(f"ranks did not start: {[_finish(n, 5) for n in nodes]}")
    return nodes, read_pids(tmp_path, 4), port


def _tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process] + process.children(recursive=True)


@pytest.mark.parametrize("lost", [1, 0])
@pytest.mark.parametrize("run", range(REPEATS))
def test_a_killed_nodes_launcher_is_named_by_the_other_within_two_seconds(tmp_path, lost, run):
    nodes, pids, _ = _start_hanging(tmp_path)
    killed_at = time.monotonic()
    nodes[lost].send_signal(signal.SIGKILL)
    survivor = nodes[1 - lost]
    _, err = _finish(survivor, 30)
    elapsed = time.monotonic() - killed_at
    _finish(nodes[lost], 5)
    assert elapsed < 2.0, (elapsed, err)
    assert survivor.returncode not in (0, None), err
    ranks = "0-1" if lost == 0 else "2-3"
    # Not a rank of the survivor that lost its connections (a consequence): the lost node.
    assert re.search(rf"lost node {lost} \([^,]+, ranks {ranks}\): its distrib-run's connection closed", err), err
    assert "root cause" not in err, err
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker to be gone")


@pytest.mark.parametrize("lost", [1, 0])
def test_a_node_stopped_without_closing_anything_is_named_within_ten_seconds(tmp_path, lost):
    nodes, pids, _ = _start_hanging(tmp_path)
    stopped = _tree(nodes[lost].pid)
    for process in stopped:
        process.suspend()  # SIGSTOP: launcher and workers alike; their sockets stay open
    try:
        started = time.monotonic()
        _, err = _finish(nodes[1 - lost], 30)
        elapsed = time.monotonic() - started
    finally:
        for process in stopped:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert elapsed < 10.0, (elapsed, err)
    assert f"lost node {lost} (" in err and f"sent nothing for {NODE_SILENCE:g}s" in err, err
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker to be gone")


def _store(port: int):
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", port, None, is_master=False, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=10))


def test_the_store_holds_no_secret_and_ignores_forged_records(tmp_path):
    key_file = tmp_path / "key"
    env = {"DISTRIB_KEY_FILE": str(key_file)}
    nodes, pids, port = _start_hanging(tmp_path, env)
    try:
        store = _store(port)
        prefix = f"distrib/127.0.0.1:{port}/nodes"
        assert key_file.stat().st_mode & 0o077 == 0  # made on first use, for this user only
        secret_values = [key_file.read_text().strip()]
        from distrib.launcher._secret import derive

        secret_values.append(derive(secret_values[0], f"127.0.0.1:{port}"))
        keys = store.list_keys()
        assert f"{prefix}/node/0" in keys and f"{prefix}/node/1" in keys, keys
        for key in keys:  # every key of the launch, workers' ones included
            value = store.get(key).decode(errors="replace")
            assert not any(s in value for s in secret_values), (key, value)
        # A stranger who reaches the port: a forged failure record does not stop the launch ...
        store.set(f"{prefix}/failure/1", b'{"rank": 3, "timestamp": 0, "message": "forged"}')
        store.add(f"{prefix}/failed", 1)
        time.sleep(2.0)
        assert all(n.poll() is None for n in nodes)
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
    outputs = [_finish(n, 30) for n in nodes]
    err0 = outputs[0][1]
    # ... and is said once, by key.
    assert err0.count(f"ignored the value under {prefix}/failure/1") == 1, err0
    assert "forged" not in err0
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker to be gone")


def test_a_forged_node_record_is_ignored_and_the_real_node_joins():
    port = free_port()
    node0 = _node(0, port, script("hello.py"))
    try:
        wait_for(lambda: _reachable(port), 60, "node 0's store")
        _store(port).set(f"distrib/127.0.0.1:{port}/nodes/node/1", b'{"nprocs": 99, "host": "evil"}')
        node1 = _node(1, port, script("hello.py"))
        out1, err1 = _finish(node1, 120)
        out0, err0 = _finish(node0, 60)
    finally:
        if node0.poll() is None:
            node0.kill()
    assert node0.returncode == 0 and node1.returncode == 0, err0 + err1
    assert sorted(re.findall(r" RANK=(\d) ", out0 + out1)) == ["0", "1", "2", "3"]  # not 99 ranks
    assert "WORLD_SIZE=4 " in out0
    assert f"ignored the value under distrib/127.0.0.1:{port}/nodes/node/1" in err0


def _reachable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_nodes_with_different_secrets_fail_at_the_rendezvous_saying_what_to_set():
    port = free_port()
    nodes = [start_cli("--nnodes", "2", "--node-rank", str(k), "--master-addr", "127.0.0.1", "--master-port",
                       str(port), "--rdzv-timeout", "5", script("hello.py"), env={"DISTRIB_SECRET": f"secret-{k}"})
             for k in (0, 1)]
    outputs = [_finish(n, 60) for n in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode not in (0, None) and " hello " not in out, err
        assert "do not share a secret" in err and "DISTRIB_SECRET" in err, err


def test_a_key_file_others_can_read_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("x" * 64)
    key.chmod(0o644)
    result = run_cli("--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port",
                     str(free_port()), "--rdzv-timeout", "5", script("hello.py"), env={"DISTRIB_KEY_FILE": str(key)})
    assert result.returncode == 2, result.stderr
    assert f"chmod 600 {key}" in result.stderr


def test_a_secret_from_the_environment_is_shared_without_the_store(tmp_path):
    port = free_port()
    env = {"DISTRIB_SECRET": "from-the-job-system"}
    nodes = [_node(k, port, script("print_secret.py"), env=env) for k in (1, 0)]
    outputs = [_finish(n, 120) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs
    digests = set(re.findall(r"secret sha256 (\w+)", outputs[0][0] + outputs[1][0]))
    assert len(digests) == 1  # the four ranks agree
    assert digests != {hashlib.sha256(b"from-the-job-system").hexdigest()}  # derived per launch
    assert os.environ.get("DISTRIB_SECRET") != "from-the-job-system"
