"""SLURM: detection from srun's variables, and distrib-run --launcher slurm on a real cluster.

The cluster tests start a real one-node SLURM (munge, slurmctld, slurmd; see
slurm_cluster.py), installing Debian's packages first where they are
missing, and skip only where that is impossible.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from distrib.errors import ConfigError
from distrib.launcher.slurm import slurm_environment
from distrib.ports import PORT_RANGE, port_for_launch_id
from distrib.runtime import _resolve_info

from .conftest import REPO, child_env, distrib_run_argv, script
from .slurm_cluster import which

# What srun sets for task 5 of 8 on the second of three nodes (3 + 3 + 2 tasks).
SRUN_TASK = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3", "SLURM_PROCID": "5", "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_NODES": "3", "SLURM_NNODES": "3",
    "SLURM_STEP_NODELIST": "gpu[07-08],cpu1", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
    "SLURM_STEP_TASKS_PER_NODE": "3(x2),2",
}


# -- detection (environments as srun writes them) -------------------------------------

def test_srun_task_variables_become_launch_info():
    env = slurm_environment(SRUN_TASK)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8"
    assert env["LOCAL_RANK"] == "2" and env["LOCAL_WORLD_SIZE"] == "3"
    assert env["NODE_RANK"] == "1" and env["NNODES"] == "3"
    assert env["MASTER_ADDR"] == "gpu07"  # the first host of the expanded node list
    assert env["DISTRIB_LAUNCH_ID"] == "slurm-4242.3"
    assert int(env["MASTER_PORT"]) == port_for_launch_id("slurm-4242.3")
    info = _resolve_info(SRUN_TASK)
    assert (info.rank, info.world_size, info.local_rank, info.node_rank) == (5, 8, 2, 1)


def test_two_steps_of_one_job_get_different_ports():
    ports = {int(slurm_environment({**SRUN_TASK, "SLURM_STEP_ID": str(step)})["MASTER_PORT"])
             for step in range(8)}
    assert len(ports) == 8 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)


def test_explicit_variables_win_where_they_are_choices():
    info = _resolve_info({**SRUN_TASK, "MASTER_PORT": "29555", "MASTER_ADDR": "10.1.2.3", "RANK": "5"})
    assert (info.master_port, info.master_addr, info.rank) == (29555, "10.1.2.3", 5)


def test_an_explicit_variable_that_contradicts_slurm_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"RANK=3 is set explicitly, but SLURM says RANK=5 "
                                          r"\(SLURM_PROCID=5\)"):
        _resolve_info({**SRUN_TASK, "RANK": "3"})
    with pytest.raises(ConfigError, match=r"LOCAL_WORLD_SIZE=4 .* \(SLURM_STEP_TASKS_PER_NODE="):
        _resolve_info({**SRUN_TASK, "LOCAL_WORLD_SIZE": "4"})


def test_processes_of_another_launcher_and_non_tasks_are_left_alone():
    assert slurm_environment({**SRUN_TASK, "TORCHELASTIC_RUN_ID": "x"}) is None  # torchrun in a job
    assert slurm_environment({**SRUN_TASK, "DISTRIB_LAUNCH_ID": "y"}) is None  # distrib-run in a job
    batch_script = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert slurm_environment(batch_script) is None
    assert slurm_environment({}) is None


def test_an_incomplete_srun_environment_says_what_is_missing():
    broken = {k: v for k, v in SRUN_TASK.items() if not k.endswith("NODELIST")}
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST is not"):
        slurm_environment(broken)


# -- a real one-node cluster ------------------------------------------------------------


def _run(slurm, argv, timeout=120, extra=None):
    env = child_env({**slurm.env, **(extra or {})})
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_srun_tasks_find_slurm_on_their_own(slurm):
    result = _run(slurm, [which("srun"), "-n", "4", os.sys.executable, script("slurm_detect.py")])
    assert result.returncode == 0, result.stderr + slurm.logs()
    records = [json.loads(x) for x in re.findall(r"^DETECTED (.*)$", result.stdout, re.M)]
    assert sorted(r["rank"] for r in records) == [0, 1, 2, 3]
    launch_ids = {r["launch_id"] for r in records}
    assert len(launch_ids) == 1 and re.fullmatch(r"slurm-\d+\.\d+", launch_ids.pop())
    for r in records:
        assert (r["world"], r["local_world"], r["node"], r["nnodes"]) == (4, 4, 0, 1)
        assert r["local_rank"] == r["rank"] and r["master"] == slurm.node
        assert r["gathered"] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_distrib_run_launcher_slurm_runs_a_torchrun_script_through_srun(slurm, tmp_path):
    argv = [which("salloc"), "-n", "4", *distrib_run_argv(
        "--launcher", "slurm", "--nprocs", "4", "--log-dir", str(tmp_path), script("torchrun_style.py"))]
    result = _run(slurm, argv, timeout=200)
    assert result.returncode == 0, result.stderr + slurm.logs()
    lines = sorted(re.findall(r"^\[(\d)\] rank (\d)/4 local (\d) allreduce=(\S+)$", result.stdout, re.M))
    assert lines == [(str(r), str(r), str(r), "10") for r in range(4)], result.stdout
    for r in range(4):
        assert f"rank {r}/4" in (tmp_path / f"rank{r}.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_slurm_launcher_gives_its_tasks_one_secret_that_the_store_never_holds(slurm):
    digests = []
    for step in range(2):
        argv = [which("salloc"), "-n", "3", *distrib_run_argv("--launcher", "slurm", "--nprocs", "3",
                                                              script("slurm_secret.py"))]
        result = _run(slurm, argv, timeout=200, extra={"DISTRIB_SECRET": ""})
        assert result.returncode == 0, result.stderr + slurm.logs()
        lines = re.findall(r"SECRET rank (\d) sha256 (\w+) length (\d+) keys (\d+) leaked (.*)$",
                           result.stdout, re.M)
        assert sorted(rank for rank, *_ in lines) == ["0", "1", "2"], result.stdout
        assert len({digest for _, digest, *_ in lines}) == 1  # one secret for the step
        assert all(int(length) >= 32 and int(keys) > 0 and leaked == "[]"
                   for _, _, length, keys, leaked in lines), lines
        digests.append(lines[0][1])
    assert digests[0] != digests[1]  # a fresh one per step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_distrib_run_launcher_slurm_reports_the_root_cause(slurm):
    argv = [which("salloc"), "-n", "3", *distrib_run_argv(
        "--launcher", "slurm", "--nprocs", "3", "--show-ranks", "1", script("fail.py"), "raise", "1")]
    result = _run(slurm, argv, timeout=200)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"rank 1 .*raised ValueError: rank 1 exploded on purpose; exit code 1 \[root cause\]",
                     result.stderr), result.stderr
    assert "in explode" in result.stderr
    assert not re.search(r"^\[[02]\]", result.stdout + result.stderr, re.M)  # --show-ranks 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_explicit_rank_contradicting_srun_fails_naming_both(slurm):
    result = _run(slurm, [which("srun"), "-n", "2", os.sys.executable, script("slurm_detect.py")],
                  extra={"RANK": "7"})
    assert result.returncode != 0
    assert "RANK=7 is set explicitly, but SLURM says RANK=" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_to_distrib_run_reaches_every_srun_task(slurm, tmp_path):
    import psutil

    from .conftest import alive, read_pids, wait_for

    argv = [which("salloc"), "-n", "2", *distrib_run_argv(
        "--launcher", "slurm", "--nprocs", "2", "--grace", "5", script("tree.py"), str(tmp_path))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(slurm.env), cwd=str(REPO))
    pids: list[int] = []
    try:
        wait_for(lambda: all((tmp_path / f"rank{r}.pids").exists() for r in range(2)), 120,
                 "both srun tasks to start")
        pids = read_pids(tmp_path, 2)
        launcher = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "distrib.cli" in " ".join(p.cmdline())]
        assert len(launcher) == 1
        launcher[0].send_signal(2)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err  # salloc passes on distrib-run's status
        assert "distrib-run: received SIGINT" in err and "distrib-run: distrib-run" not in err
        assert all((tmp_path / f"rank{r}.sigint").exists() for r in range(2)), err  # tasks got SIGINT
        task_pids = pids[0::2]
        wait_for(lambda: not any(alive(p) for p in task_pids), 15, "the srun tasks to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # The tasks' own children are SLURM's to reap: with proctrack/linuxproc (no cgroups)
        # SLURM may miss a child whose task died first. Remove any, by pid, so none outlives us.
        for pid in pids:
            if alive(pid):
                os.kill(pid, 9)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_bare_srun_a_rank_killed_in_a_barrier_is_named_by_the_others(slurm, tmp_path):
    # No distrib launcher beside the tasks: the survivors' Coordinator calls must end
    # (within their timeout) naming the rank that died, never hang.
    from distrib.bench import _fault_rank

    started = time.monotonic()
    result = _run(slurm, [which("srun"), "-n", "3", os.sys.executable, _fault_rank.__file__],
                  extra={"DISTRIB_FAULT_DIR": str(tmp_path), "DISTRIB_FAULT_KIND": "sigkill",
                         "DISTRIB_FAULT_STAGE": "barrier"}, timeout=200)
    elapsed = time.monotonic() - started
    print(f"bare srun, rank 0 SIGKILLed in a barrier: srun returned {elapsed:.2f}s after it started")
    assert elapsed < 90, result.stderr  # the tasks' timeout is 60 s
    assert result.returncode != 0
    assert (tmp_path / "fault.0").exists()
    survivors = re.findall(r"CoordinatorError: world barrier failed on rank ([12])\b.*hosted by rank 0 "
                           r"\(no launcher beside the ranks\): rank 0 has probably exited", result.stderr)
    assert sorted(set(survivors)) == ["1", "2"], result.stderr


@pytest.mark.parametrize("changes, message", [
    (dict(node_rank=1), "--node-rank is not used"),
    (dict(max_restarts=2), "--max-restarts is not supported with --launcher slurm"),
    (dict(local_ranks_filter=frozenset({0})), "--redirects and --local-ranks-filter are not used"),
])
def test_options_srun_decides_are_refused_with_the_reason(changes, message):
    from distrib.launcher.api import Command, CommandOptions
    from distrib.launcher.slurm import SlurmLauncher

    launcher = SlurmLauncher.__new__(SlurmLauncher)
    launcher._srun = "srun"
    with pytest.raises(ConfigError, match=message):
        launcher.srun_argv(Command("x.py"), 2, CommandOptions(**changes))
    # Nodes that number themselves (no --node-rank) are srun's to place: no error.
    assert "x.py" in " ".join(launcher.srun_argv(Command("x.py"), 2, CommandOptions(nnodes=2, node_rank=None)))
