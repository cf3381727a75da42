"""Fixtures for the launcher tests: how to run distrib-run, and the scripts it runs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import psutil
import pytest

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]


def distrib_run_argv(*args: str) -> list[str]:
    """The distrib-run command line (through the interpreter running the tests)."""
    return [sys.executable, "-m", "distrib.cli", *args]


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    # Workers import distrib from this checkout even where it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "DISTRIB_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "NODE_RANK",
                 "GROUP_RANK", "NNODES"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def run_cli(*args: str, timeout: float = 120, env: Optional[dict] = None,
            prefix: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """Run distrib-run to completion; returns the completed process (text output)."""
    return subprocess.run([*prefix, *distrib_run_argv(*args)], capture_output=True, text=True,
                          timeout=timeout, env=child_env(env), cwd=str(REPO))


def start_cli(*args: str, env: Optional[dict] = None, prefix: Iterable[str] = ()) -> subprocess.Popen:
    """Start distrib-run in the background (text output on pipes)."""
    return subprocess.Popen([*prefix, *distrib_run_argv(*args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(env), cwd=str(REPO))


def script(name: str) -> str:
    return str(SCRIPTS / name)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_pids(folder: Path, nprocs: int) -> list[int]:
    """Every pid the tree.py / hang_after_start.py ranks wrote."""
    pids = []
    for rank in range(nprocs):
        pids += [int(p) for p in (folder / f"rank{rank}.pids").read_text().split()]
    return pids


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node SLURM cluster (installed with apt-get where missing)."""
    from .slurm_cluster import SlurmCluster, ensure_installed

    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# Writer rank 0 (node 0), then writer rank 3 (node 1), two ranks per node: how each rank
# takes part in the two channels that scripts/channel.py makes.
CHANNEL_TRANSPORTS = {0: ["writer", "zmq"], 1: ["shm", "zmq"], 2: ["zmq", "shm"], 3: ["zmq", "writer"]}


def channel_results(*outputs: str) -> dict:
    """Every rank's RESULT record that scripts/channel.py printed, by rank."""
    import json
    import re

    records = {}
    for out in outputs:
        for line in re.findall(r"^\[\d\] RESULT (.*)$", out, re.M):
            record = json.loads(line)
            records[record["rank"]] = record
    return records
