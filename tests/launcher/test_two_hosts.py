"""Two hosts without a cluster: two network namespaces joined by a veth pair.

Each namespace has its own network stack and address (10.200.0.1 and
10.200.0.2, which exist only inside them), so the two ``distrib-run --nnodes 2``
see each other only through the veth pair, as two machines on one network
would. Needs root (CI runs as root); skipped, with the reason, where network
namespaces cannot be made.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from .conftest import CHANNEL_TRANSPORTS, alive, channel_results, read_pids, script, start_cli, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

ADDRESSES = ("10.200.0.1", "10.200.0.2")
PORT = 29411  # free by construction: nothing else lives in these namespaces


@dataclass(frozen=True)
class TwoHosts:
    namespaces: tuple[str, str]
    interfaces: tuple[str, str]

    def prefix(self, host: int) -> list[str]:
        """Runs a command inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[host]]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed; cannot make network namespaces")
    tag = str(os.getpid())[-6:]
    namespaces = (f"distrib-a{tag}", f"distrib-b{tag}")
    interfaces = (f"dra{tag}", f"drb{tag}")  # interface names have at most 15 characters
    try:
        _ip("netns", "add", namespaces[0])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace (needs root / CAP_SYS_ADMIN): {exc.stderr.strip()}")
    try:
        _ip("netns", "add", namespaces[1])
        _ip("link", "add", interfaces[0], "type", "veth", "peer", "name", interfaces[1])
        for ns, dev, address in zip(namespaces, interfaces, ADDRESSES):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield TwoHosts(namespaces, interfaces)
    finally:
        for ns in namespaces:
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in listed.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)  # nothing of ours may outlive the test
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes the veth with it


def _node(hosts: TwoHosts, node_rank: int, *args: str) -> subprocess.Popen:
    return start_cli("--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", ADDRESSES[0],
                     "--master-port", str(PORT), "--nprocs", "2", "--rdzv-timeout", "60", *args,
                     prefix=hosts.prefix(node_rank))


def _finish(*procs: subprocess.Popen, timeout: float) -> list[tuple[str, str]]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def test_rendezvous_coordinator_and_gloo_all_reduce_across_hosts(two_hosts):
    nodes = [_node(two_hosts, k, "--show-ranks", "0-3", script("coordinate.py")) for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0, err0
    assert nodes[0].returncode == 0, err1
    results = {}
    for node, out in ((0, out0), (1, out1)):
        for line in re.findall(r"^\[\d\] RESULT (.*)$", out, re.M):
            record = json.loads(line)
            assert record["node"] == node
            # distrib-run chose the interface that reaches node 0 for gloo
            assert record["ifname"] == two_hosts.interfaces[node]
            results[record["rank"]] = record
    assert sorted(results) == [0, 1, 2, 3]
    tokens = {r["token"] for r in results.values()}
    assert len(tokens) == 1 and tokens.pop().startswith("token-from-")  # broadcast from rank 0
    for record in results.values():
        assert record["world"] == 4
        assert record["sum"] == 1 + 2 + 3 + 4  # gloo all-reduce through torch.distributed
        assert record["gathered"] == [{"rank": r, "node": r // 2, "master": ADDRESSES[0]}
                                      for r in range(4)]


def test_tp_inside_each_host_and_pp_across_hosts_on_gloo(two_hosts):
    nodes = [_node(two_hosts, k, "--show-ranks", "0-3", script("groups.py")) for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0, err0
    assert nodes[0].returncode == 0, err1
    records = channel_results(out0, out1)
    assert sorted(records) == [0, 1, 2, 3]
    for rank, record in records.items():
        tp, pp = record["tp"], record["pp"]
        assert record["node"] == rank // 2
        assert tp["ranks"] == [rank - rank % 2, rank - rank % 2 + 1] and tp["nnodes"] == 1
        assert tp["sum"] == sum(r + 1 for r in tp["ranks"]) and tp["local"] == [rank % 2, 2]
        assert pp["ranks"] == [rank % 2, rank % 2 + 2] and pp["nnodes"] == 2
        assert pp["node_rank"] == rank // 2 and pp["local"] == [0, 1]
        for name in ("custom", "ipc"):
            assert "spans 2 nodes; CUDA IPC works only within one node" in pp[name], pp[name]
            assert "spans 2 nodes" in pp["disabled"][name], pp["disabled"]
        assert pp["chain"][0] == "gloo"
        if rank >= 2:  # stage 1 received stage 0's tensors, across the hosts
            sender = rank - 2
            assert pp["received"] == {"first": [10.0 * sender, 10.0 * sender + 1, 10.0 * sender + 2],
                                      "dict": [10.0 * sender, 10.0 * sender + 1, 10.0 * sender + 2],
                                      "step": 3}


def test_a_kubeflow_job_runs_with_torchruns_pet_variables_alone(two_hosts):
    """As a PyTorchJob's containers run `distrib-run train.py` in place of `torchrun train.py`."""
    nodes = []
    for k in (1, 0):
        env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": str(k),
               "PET_MASTER_ADDR": ADDRESSES[0], "PET_MASTER_PORT": str(PORT)}
        nodes.append(start_cli("--rdzv-timeout", "60", script("hello.py"), env=env, prefix=two_hosts.prefix(k)))
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0 and nodes[0].returncode == 0, err0 + err1
    ranks = sorted(int(r) for r in re.findall(r" RANK=(\d) ", out0 + out1))
    assert ranks == [0, 1, 2, 3]
    assert re.findall(r"NODE_RANK=(\d)", out1) == ["1", "1"]


def test_torchrun_style_endpoint_without_node_ranks_numbers_the_hosts(two_hosts):
    argv = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{ADDRESSES[0]}:{PORT}", "--rdzv-timeout", "60", script("hello.py")]
    nodes = [start_cli(*argv, prefix=two_hosts.prefix(k)) for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0 and nodes[0].returncode == 0, err0 + err1
    # The host of the endpoint is node 0, the other host node 1.
    assert set(re.findall(r"NODE_RANK=(\d)", out0)) == {"0"} and set(re.findall(r"NODE_RANK=(\d)", out1)) == {"1"}


def test_both_hosts_restart_together_after_a_rank_on_one_fails(two_hosts):
    nodes = [_node(two_hosts, k, "--max-restarts", "1", script("flaky.py"), "3", "1") for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=170)
    assert nodes[1].returncode == 0, err0
    assert nodes[0].returncode == 0, err1
    for out in (out0, out1):
        assert sorted(set(re.findall(r"attempt=(\d)", out))) == ["0", "1"], out
    for err in (err0, err1):
        assert "attempt 0 failed: rank 3" in err and "restart 1 of 1" in err, err


def _start_hanging_ranks(two_hosts, tmp_path):
    """Both hosts' distrib-run with 2 ranks each that hang once started; (nodes, the 4 ranks' pids)."""
    nodes = [_node(two_hosts, k, "--grace", "2", script("hang_after_start.py"), str(tmp_path))
             for k in (0, 1)]
    try:
        wait_for(lambda: all((tmp_path / f"rank{r}.pids").exists() for r in range(4)), 120,
                 "all four ranks to start their coordinators")
    except AssertionError:
        outputs = _finish(*nodes, timeout=5)
        raise AssertionError(f"ranks did not start: {outputs}")
    return nodes, read_pids(tmp_path, 4)


def test_killing_one_hosts_workers_fails_the_other_host_cleanly(two_hosts, tmp_path):
    nodes, pids = _start_hanging_ranks(two_hosts, tmp_path)
    for pid in pids[2:]:  # node 1's workers
        os.kill(pid, signal.SIGKILL)
    (out0, err0), (out1, err1) = _finish(*nodes, timeout=60)
    assert nodes[1].returncode == 128 + signal.SIGKILL, err1
    assert re.search(r"rank [23] .*killed by signal SIGKILL.*\[root cause\]", err1), err1
    # Node 0 learns of it from node 1 and stops its own workers, instead of hanging in a barrier.
    assert nodes[0].returncode == 128 + signal.SIGKILL, err0
    assert re.search(r"rank [23] .*killed by signal SIGKILL.*\[root cause\]", err0), err0
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker to be gone")


def test_broadcast_channel_across_hosts_uses_shared_memory_on_the_writers_host_and_zmq_across(two_hosts):
    nodes = [_node(two_hosts, k, "--show-ranks", "0-3", script("channel.py")) for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0, err0
    assert nodes[0].returncode == 0, err1
    records = channel_results(out0, out1)
    assert sorted(records) == [0, 1, 2, 3]
    # Writer rank 0 (host 0), then writer rank 3 (host 1); each binds its own host's address.
    for rank, record in records.items():
        assert [c["transport"] for c in record["channels"]] == CHANNEL_TRANSPORTS[rank]
        assert all(c["ok"] for c in record["channels"]), record
        first, second = (c["endpoint"] for c in record["channels"])
        assert first.startswith(f"tcp://{ADDRESSES[0]}:") and second.startswith(f"tcp://{ADDRESSES[1]}:")


def test_each_host_listens_only_on_its_own_address_and_loopback(two_hosts):
    nodes = [_node(two_hosts, k, "--show-ranks", "0-3", script("listening.py")) for k in (1, 0)]
    (out1, err1), (out0, err0) = _finish(*nodes, timeout=150)
    assert nodes[1].returncode == 0, err0
    assert nodes[0].returncode == 0, err1
    records = [json.loads(line) for out in (out0, out1)
               for line in re.findall(r"^\[\d\] RESULT (.*)$", out, re.M)]
    assert sorted(r["rank"] for r in records) == [0, 1, 2, 3]
    assert ADDRESSES[0] in next(r for r in records if r["rank"] == 0)["launcher_listens"]  # the store
    for record in records:
        allowed = {"127.0.0.1", "::1", ADDRESSES[record["node"]]}
        listens = set(record["rank_listens"] + record["launcher_listens"])
        assert listens <= allowed, (record, "a wildcard or another host's address")


@pytest.mark.parametrize("killed", [0, 1])
def test_a_hosts_launcher_sigkilled_stops_the_other_host_naming_what_was_lost(two_hosts, tmp_path, killed):
    nodes, pids = _start_hanging_ranks(two_hosts, tmp_path)
    killed_at = time.monotonic()
    nodes[killed].send_signal(signal.SIGKILL)
    survivor = 1 - killed
    (_, err), = _finish(nodes[survivor], timeout=60)
    _finish(nodes[killed], timeout=5)
    # Both see the other's node link close at once (node 1 also sees node 0's store go).
    elapsed = time.monotonic() - killed_at
    print(f"node {killed}'s launcher SIGKILLed: node {survivor}'s launcher exited {elapsed:.2f}s later")
    assert elapsed < 2.0, err
    assert nodes[survivor].returncode not in (0, None), err
    lost_ranks = "[01]" if killed == 0 else "[23]"
    assert re.search(rf"nodes? {killed}\b|ranks? {lost_ranks}\b", err), err
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker on both hosts to be gone")


@pytest.mark.parametrize("stopped", [0, 1])
def test_a_host_stopped_without_closing_anything_is_named_within_ten_seconds(two_hosts, tmp_path, stopped):
    import psutil

    nodes, pids = _start_hanging_ranks(two_hosts, tmp_path)
    root = psutil.Process(nodes[stopped].pid)
    frozen = [root] + root.children(recursive=True)
    for process in frozen:
        process.suspend()  # a host that hangs: its sockets stay open, nothing more comes
    survivor = 1 - stopped
    try:
        started = time.monotonic()
        (_, err), = _finish(nodes[survivor], timeout=60)
        elapsed = time.monotonic() - started
    finally:
        for process in frozen:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    _finish(nodes[stopped], timeout=5)
    print(f"node {stopped} stopped: node {survivor}'s launcher exited {elapsed:.2f}s later")
    assert elapsed < 10.0, err
    assert nodes[survivor].returncode not in (0, None), err
    assert re.search(rf"lost node {stopped} \(.*sent nothing for", err), err
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every worker on both hosts to be gone")
