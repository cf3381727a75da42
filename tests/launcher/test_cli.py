"""distrib-run on one node: environment, output, logs, failures, signals, orphans."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from distrib.bench.faults import MARK_VAR, marked_processes
from distrib.cli import parse_ranks
from distrib.errors import ConfigError
from distrib.launcher import CommandLauncher, SubprocessLauncher, launchers

from .conftest import alive, child_env, read_pids, run_cli, script, start_cli, wait_for

pytestmark = pytest.mark.timeout(120)


def _fields(line: str) -> dict:
    return dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)


def test_hello_sets_launch_info_and_torchrun_variables():
    result = run_cli("--nprocs", "3", script("hello.py"), "--lr", "3e-4")
    assert result.returncode == 0, result.stderr
    hellos = [line for line in result.stdout.splitlines() if " hello " in line]
    assert len(hellos) == 3
    seen = set()
    for line in hellos:
        rank = int(re.match(r"^\[(\d+)\] hello ", line).group(1))
        fields = _fields(line)
        assert fields["RANK"] == str(rank) and fields["LOCAL_RANK"] == str(rank)
        assert fields["WORLD_SIZE"] == "3" and fields["LOCAL_WORLD_SIZE"] == "3"
        assert fields["NODE_RANK"] == "0" and fields["NNODES"] == "1"
        assert fields["MASTER_ADDR"] == "127.0.0.1" and int(fields["MASTER_PORT"]) > 0
        assert fields["DISTRIB_LAUNCH_ID"] and fields["TORCHELASTIC_RUN_ID"] == fields["DISTRIB_LAUNCH_ID"]
        assert fields["OMP_NUM_THREADS"] == "1"  # set because nprocs > 1 and it was unset
        seen.add(rank)
    assert seen == {0, 1, 2}
    # The script sees its own arguments and runs as __main__, as under `python script.py`.
    assert result.stdout.count("argv=['--lr', '3e-4'] name=__main__") == 3
    assert sorted(re.findall(r"^\[(\d)\] stderr of rank \1$", result.stderr, re.M)) == ["0", "1", "2"]


def test_console_script_and_omp_threads_left_alone_when_set():
    exe = shutil.which("distrib-run", path=os.path.dirname(sys.executable))
    assert exe, "the distrib-run console script is not installed next to the interpreter"
    result = subprocess.run([exe, "--nprocs", "2", script("hello.py")], capture_output=True,
                            text=True, timeout=60, env=child_env({"OMP_NUM_THREADS": "3"}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OMP_NUM_THREADS=3") == 2


def test_module_mode():
    result = run_cli("--nprocs", "2", "-m", "json.tool", "--help")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^\[[01]\] usage: ", result.stdout, re.M)) == 2


@pytest.mark.slow
def test_torchrun_style_script_runs_unchanged():
    result = run_cli("--nprocs", "2", script("torchrun_style.py"), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = sorted(re.findall(r"^\[(\d)\] rank (\d)/2 local (\d) allreduce=(\S+)$", result.stdout, re.M))
    assert lines == [("0", "0", "0", "3"), ("1", "1", "1", "3")], result.stdout


def test_lines_are_prefixed_and_never_mixed():
    result = run_cli("--nprocs", "3", script("chatty.py"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * 301
    pattern = re.compile(r"^\[(\d)\] rank=\1 (line=\d+ \1{200}|no newline at the end)$")
    bad = [line[:80] for line in lines if not pattern.match(line)]
    assert not bad, f"{len(bad)} lines mixed or unprefixed, e.g. {bad[:3]}"
    for rank in "012":  # each rank's lines arrive in its own order
        numbers = [int(m) for m in re.findall(rf"^\[{rank}\] rank={rank} line=(\d+)", result.stdout, re.M)]
        assert numbers == list(range(300))


def test_log_dir_keeps_each_rank_and_show_ranks_filters_the_console(tmp_path):
    logs = tmp_path / "logs"
    result = run_cli("--nprocs", "3", "--log-dir", str(logs), "--show-ranks", "1", script("hello.py"))
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^\[(\d)\]", result.stdout, re.M) == ["1", "1"]
    assert re.findall(r"^\[(\d)\]", result.stderr, re.M) == ["1"]
    for rank in range(3):
        text = (logs / f"rank{rank}.log").read_text()
        assert f"RANK={rank} " in text and f"stderr of rank {rank}" in text
        assert not text.startswith("[")  # files are unprefixed


def test_parse_ranks():
    assert parse_ranks("0,2-4") == {0, 2, 3, 4}
    for bad in ("", "x", "3-1", "-1"):
        with pytest.raises(ConfigError):
            parse_ranks(bad)


def test_exception_is_the_root_cause_with_its_traceback():
    result = run_cli("--nprocs", "3", "--grace", "2", script("fail.py"), "raise", "1")
    assert result.returncode == 1
    err = result.stderr
    assert "1 rank failed" in err
    assert re.search(r"rank 1 .*raised ValueError: rank 1 exploded on purpose; exit code 1 \[root cause\]", err)
    assert "in explode" in err and "fail.py" in err  # the traceback's last lines
    assert "_bootstrap" not in err  # our own frames are not part of the user's traceback
    # The other ranks were stopped by distrib-run, not failures of their own.
    assert not re.search(r"^  rank [02] ", err, re.M)


def test_exit_code_is_the_root_cause_ranks_and_every_failed_rank_is_named():
    result = run_cli("--nprocs", "3", "--grace", "10", script("fail.py"), "exit7", "1", "2")
    assert result.returncode == 7, result.stderr
    err = result.stderr
    assert "2 ranks failed" in err
    root = re.search(r"^  rank 1 .*exit code 7 \[root cause\]$", err, re.M)
    later = re.search(r"^  rank 2 .*raised RuntimeError: rank 2 failed later; exit code 1$", err, re.M)
    assert root and later and root.start() < later.start(), err
    assert "exiting with code 7, that of rank 1" in err


def test_death_by_signal_is_named():
    result = run_cli("--nprocs", "2", "--grace", "2", script("fail.py"), "sigkill", "0")
    assert result.returncode == 128 + signal.SIGKILL
    assert re.search(r"rank 0 on \S+ was killed by signal SIGKILL; exit code 137 \[root cause\]", result.stderr)


def _start_tree(tmp_path, *extra, env=None):
    proc = start_cli("--nprocs", "2", *extra, script("tree.py"), str(tmp_path),
                     *(["ignore-term"] if "--grace" in extra else []), env=env)
    try:
        wait_for(lambda: all((tmp_path / f"rank{r}.pids").exists() for r in range(2)), 60,
                 "both ranks to start their children")
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    pids = read_pids(tmp_path, 2)
    assert len(pids) == 4 and all(alive(p) for p in pids)
    return proc, pids


def test_sigint_reaches_every_worker_and_its_children(tmp_path):
    proc, pids = _start_tree(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "received SIGINT" in err
    assert all((tmp_path / f"rank{r}.sigint").exists() for r in range(2))  # the workers got SIGINT
    wait_for(lambda: not any(alive(p) for p in pids), 10, "workers and their children to be gone")


def test_sigterm_then_grace_then_sigkill(tmp_path):
    proc, pids = _start_tree(tmp_path, "--grace", "1")  # the workers ignore SIGTERM
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - started >= 0.9  # it waited out the grace period
    wait_for(lambda: not any(alive(p) for p in pids), 10, "workers and their children to be gone")


def test_sigkill_of_distrib_run_leaves_nothing_behind(tmp_path):
    # Neither a worker, nor a worker's child, nor a helper (the store's process, the
    # guardian), nor the launch's scratch folder.
    mark, scratch_parent = uuid.uuid4().hex, tmp_path / "tmp"
    scratch_parent.mkdir()
    proc, pids = _start_tree(tmp_path, env={"TMPDIR": str(scratch_parent), MARK_VAR: mark})
    assert [p.name for p in scratch_parent.iterdir()], "the launch should have a scratch folder"
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not any(alive(p) for p in pids), 15,
             f"workers and their children {pids} to die with their launcher")
    wait_for(lambda: not marked_processes(mark), 10, "every process of the launch to be gone")
    wait_for(lambda: not list(scratch_parent.iterdir()), 10, "the scratch folder to be removed")


def test_nprocs_auto_is_one_per_cpu_here():
    result = run_cli("--nprocs", "auto", "--devices", "cpu", script("hello.py"))
    assert result.returncode == 0, result.stderr
    expected = len(os.sched_getaffinity(0))
    assert result.stdout.count(" hello ") == expected
    assert f"WORLD_SIZE={expected} " in result.stdout


def test_devices_that_are_not_there_are_an_error():
    result = run_cli("--nprocs", "2", "--devices", "0,9", script("hello.py"))
    assert result.returncode == 2
    assert "--devices names GPU 9" in result.stderr or "names 2 GPUs" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--nprocs", "0"], "expected an integer >= 1"),
    (["--nprocs", "many"], "expected an integer >= 1 or auto"),
    (["--nnodes", "2"], "needs --master-addr"),
    (["--nnodes", "2", "--master-addr", "127.0.0.1"], "needs --master-port"),
    (["--node-rank", "1"], "expected 0 <= node rank < --nnodes 1"),
    (["--launcher", "multiprocessing"], "runs Python callables"),
    (["--launcher", "nope"], "launcher 'nope' is unknown; distrib-run can use: slurm, subprocess"),
])
def test_bad_arguments_say_what_was_expected(args, message):
    result = run_cli(*args, script("hello.py"), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_timeout_stops_the_launch_and_names_running_ranks():
    result = run_cli("--nprocs", "2", "--timeout", "2", "--grace", "1", script("fail.py"), "ok", "1")
    assert result.returncode == 1
    assert "timed out after 2s; rank 0 was still running" in result.stderr


def test_registry_lists_command_launchers():
    assert launchers.get("subprocess") is SubprocessLauncher
    assert issubclass(launchers.get("slurm"), CommandLauncher)
    assert not issubclass(launchers.get("multiprocessing"), CommandLauncher)


def test_a_rank_gloo_aborted_after_a_size_mismatch_is_explained_with_the_debug_hint():
    result = run_cli("--nprocs", "2", script("gloo_mismatch.py"), timeout=120)
    assert result.returncode == 134, result.stderr  # 128 + SIGABRT
    root = next(line for line in result.stderr.splitlines() if "[root cause]" in line)
    assert "killed by signal SIGABRT (gloo aborted it: ranks called a collective with different sizes" in root
    assert "DISTRIB_DEBUG=1" in root
    debug = run_cli("--nprocs", "2", script("gloo_mismatch.py"), env={"DISTRIB_DEBUG": "1"}, timeout=120)
    assert debug.returncode == 1
    assert "rank 0: all_reduce sum of float32[4] via gloo; rank 1: all_reduce sum of float32[8]" in debug.stderr
