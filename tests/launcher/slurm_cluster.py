"""A real one-node SLURM cluster for the tests: munge, slurmctld and slurmd.

Everything lives in one private folder (config, keys, sockets, state, logs)
with ports picked free, so it disturbs nothing else on the machine and two
test runs do not collide. The daemons run in the foreground as our children
and are stopped by :meth:`SlurmCluster.stop`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NEEDED = ("srun", "salloc", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")
CPUS = 8  # more than CI's 2 cores, so `srun -n 4` fits one node (SlurmdParameters=config_overrides)

_SBIN = ("/usr/sbin", "/sbin")


def which(name: str) -> Optional[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def ensure_installed() -> Optional[str]:
    """Install Debian's SLURM and munge if missing. Returns why they are unusable, or None."""
    if all(which(n) for n in NEEDED):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"SLURM is not installed and cannot be installed here (needs root and apt-get): "
                f"apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` took more than 15 minutes"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}"
    missing = [n for n in NEEDED if not which(n)]
    return f"installed {' '.join(PACKAGES)}, but {', '.join(missing)} are missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named after this host."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.node = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.munge_socket = folder / "munge" / "munge.socket"
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        """Variables that point SLURM's commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> None:
        folder = self.folder
        for sub in ("munge", "state", "spool", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        key = folder / "munge" / "munge.key"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, timeout=30)
        os.chmod(key, 0o600)
        os.chmod(folder / "munge", 0o700)
        self._spawn([which("munged"), "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
                     f"--seed-file={folder / 'munge' / 'munged.seed'}",
                     f"--log-file={folder / 'log' / 'munged.log'}"], "munged")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        self.conf.write_text(self._config())
        self._spawn([which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._spawn([which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait(self._node_idle, timeout, f"node {self.node} to become idle in sinfo")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def logs(self) -> str:
        parts = []
        for log in sorted((self.folder / "log").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------
    def _config(self) -> str:
        folder = self.folder
        return "\n".join([
            "ClusterName=distribtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in CI's containers: track processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=5",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, argv: list, name: str) -> None:
        log = open(self.folder / "log" / f"{name}.out", "wb")
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env={**os.environ, **self.env}))
        log.close()

    def _node_idle(self) -> bool:
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{self.logs()}")
        done = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=30)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}:\n{self.logs()}")
            time.sleep(0.25)
