"""distrib-run accepts what a torchrun user types: its flags, its PET_* environment, restarts."""
from __future__ import annotations

import os
import re
import tempfile
import time

import psutil
import pytest

from distrib import __version__
from distrib.cli import build_parser, options_from

from .conftest import alive, free_port, run_cli, script, start_cli

pytestmark = pytest.mark.timeout(240)


def _options(*argv: str, environ: dict | None = None):
    return options_from(build_parser(environ or {}).parse_args([*argv, "x.py"]))


def test_help_names_torchruns_flags_and_version_prints_ours():
    text = build_parser({}).format_help()
    for flag in ("--standalone", "--nnodes", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id", "--local-addr",
                 "--no-python", "--run-path", "--redirects", "--tee", "--local-ranks-filter", "--module",
                 "--max-restarts", "--nproc-per-node", "--version", "PET_NNODES"):
        assert flag in text, flag
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"distrib-run (distrib {__version__})"


@pytest.mark.parametrize("argv, expected", [
    (["--nnodes", "2:2", "--rdzv-endpoint", "10.0.0.1:29500", "--node-rank", "1"],
     dict(nnodes=2, master_addr="10.0.0.1", master_port=29500, node_rank=1)),
    (["--nnodes", "2", "--rdzv-endpoint", "node0", "--rdzv-backend", "c10d", "--rdzv-id", "job7"],
     dict(nnodes=2, master_addr="node0", master_port=29400, node_rank=None, launch_id="job7")),
    (["--rdzv-endpoint", "[fe80::1]:1234", "--nnodes", "2", "--node-rank", "0"],
     dict(master_addr="fe80::1", master_port=1234)),
    (["--standalone", "--nproc_per_node", "4", "--rdzv-endpoint", "ignored:1"],
     dict(nnodes=1, node_rank=0, master_addr=None)),
    (["--rdzv-conf", "join_timeout=42,read_timeout=60"], dict(rdzv_timeout=42.0)),
    (["--redirects", "0:1,1:3", "--local-ranks-filter", "0-1"], dict(local_ranks_filter=frozenset({0, 1}))),
])
def test_torchrun_options_map_onto_distribs(argv, expected):
    _, _, options = _options(*argv)
    for name, value in expected.items():
        assert getattr(options, name) == value, (name, getattr(options, name))


def test_redirects_say_which_streams_of_which_local_ranks():
    _, _, options = _options("--redirects", "0:1,1:3")
    assert [options.redirects.streams(r) for r in range(3)] == [1, 3, 0]
    _, _, options = _options("-r", "2")
    assert [options.redirects.streams(r) for r in range(3)] == [2, 2, 2]


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "1:4"], "fixed node count only; pass --nnodes 4"),
    (["--nnodes", "two"], "expected an integer N >= 1"),
    (["--standalone", "--nnodes", "2"], "--standalone is a launch on one node"),
    (["--rdzv-backend", "etcd"], "not supported; use static or c10d"),
    (["--rdzv-endpoint", "h:1", "--master-port", "2"], "--master-port 2 and --rdzv-endpoint h:1 disagree"),
    (["--redirects", "5"], "expected 0-3"),
    (["--show-ranks", "0", "--local-ranks-filter", "0"], "give one of them"),
    (["-m", "--no-python"], "contradict"),
])
def test_torchrun_options_that_cannot_work_are_clear_errors(argv, message):
    from distrib.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _options(*argv)


def test_pet_variables_are_the_defaults_as_under_torchrun():
    environ = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "3", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.1.2.3",
               "PET_MASTER_PORT": "23456", "PET_MAX_RESTARTS": "2", "PET_MODULE": "1"}
    command, nprocs, options = _options(environ=environ)
    assert nprocs == 3 and command.module
    assert (options.nnodes, options.node_rank, options.master_addr, options.master_port, options.max_restarts) == (
        2, 1, "10.1.2.3", 23456, 2)
    # The command line still wins.
    _, nprocs, options = _options("--nproc-per-node", "5", "--node-rank", "0", environ=environ)
    assert nprocs == 5 and options.node_rank == 0


def test_standalone_with_torchrun_spellings_runs():
    result = run_cli("--standalone", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--max_restarts", "0",
                     "--monitor_interval", "1", "--start_method", "spawn", "--run_path", script("hello.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" hello ") == 2


def test_pet_environment_alone_launches():
    result = run_cli(script("hello.py"), env={"PET_NPROC_PER_NODE": "2", "PET_STANDALONE": "1"})
    assert result.returncode == 0, result.stderr
    assert "WORLD_SIZE=2 " in result.stdout


def test_two_nodes_on_an_endpoint_number_themselves():
    port = free_port()
    argv = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "60",
            script("hello.py")]
    nodes = [start_cli(*argv), start_cli(*argv)]
    outputs = [n.communicate(timeout=120) for n in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err
    ranks = sorted(int(m) for out, _ in outputs for m in re.findall(r" RANK=(\d) ", out))
    assert ranks == [0, 1, 2, 3]
    node_ranks = sorted({int(m) for out, _ in outputs for m in re.findall(r" NODE_RANK=(\d) ", out)})
    assert node_ranks == [0, 1]


def test_workers_see_torchelastics_variables():
    result = run_cli("--nprocs", "2", script("flaky.py"), "0", "0")
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"attempt=(\d) rank=(\d) max=(\d) error_file=(\S+)", result.stdout)
    assert sorted((a, r, m) for a, r, m, _ in lines) == [("0", "0", "0"), ("0", "1", "0")]
    assert all(path.endswith(".torchelastic.json") for *_, path in lines)


def test_a_failed_attempt_is_restarted_and_the_summary_shows_both():
    result = run_cli("--nprocs", "2", "--max-restarts", "2", script("flaky.py"), "1", "1")
    assert result.returncode == 0, result.stderr
    attempts = re.findall(r"attempt=(\d) rank=(\d) max=2", result.stdout)
    assert sorted(attempts) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    launches = set(re.findall(r"launch=(\S+)", result.stdout))
    assert len(launches) == 2  # a fresh rendezvous for the restart
    assert "attempt 0 failed: rank 1" in result.stderr and "ValueError: attempt 0 fails on rank 1" in result.stderr
    assert "restarting every rank (restart 1 of 2)" in result.stderr
    assert "attempt 1: succeeded" in result.stderr


def test_restarts_give_up_with_the_last_root_cause_and_leave_nothing_behind():
    started = time.monotonic()
    result = run_cli("--nprocs", "2", "--max-restarts", "2", script("flaky.py"), "1", "9")
    assert result.returncode == 1, result.stderr  # the last root cause: a Python exception
    assert result.stdout.count("rank=1") == 3  # attempts 0, 1, 2
    for k in (0, 1):
        assert f"distrib-run: attempt {k} failed: rank 1" in result.stderr
    assert "attempt 2 (the last) failed too; gave up after 2 restarts" in result.stderr
    assert "ValueError: attempt 2 fails on rank 1 [root cause]" in result.stderr.replace("; exit code 1", "")
    pids = [int(p) for p in re.findall(r"pid=(\d+)", result.stdout)]
    assert len(pids) == 6 and not any(alive(p) for p in pids)
    assert time.monotonic() - started < 60


def test_ctrl_c_never_restarts(tmp_path):
    proc = start_cli("--nprocs", "2", "--max-restarts", "3", script("flaky.py"), "9", "9")
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while seen.count("attempt=0") < 2 and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        proc.send_signal(2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "attempt=1" not in seen + out and "restarting" not in err


def test_a_missing_or_broken_script_is_one_error_before_any_rank_starts():
    result = run_cli("--nprocs", "3", "no_such_script.py")
    assert result.returncode == 2
    assert result.stderr.count("does not exist") == 1 and "[0]" not in result.stderr
    result = run_cli("--nprocs", "3", script("broken_syntax.py"))
    assert result.returncode == 2
    assert result.stderr.count("does not compile") == 1 and "broken_syntax.py, line 2" in result.stderr


def test_only_the_program_is_required():
    result = run_cli()
    assert result.returncode == 2
    assert "the following arguments are required: program" in result.stderr
    assert "program, args" not in result.stderr


def test_show_ranks_out_of_range_names_the_valid_range():
    result = run_cli("--nprocs", "2", "--show-ranks", "5", script("hello.py"))
    assert result.returncode == 2
    assert "--show-ranks names rank 5, but the launch has ranks 0-1" in result.stderr


def test_local_ranks_filter_and_redirects_choose_the_console():
    result = run_cli("--nprocs", "2", "--local-ranks-filter", "1", script("hello.py"))
    assert result.returncode == 0 and "[1] hello" in result.stdout and "[0]" not in result.stdout
    with tempfile.TemporaryDirectory() as logs:
        result = run_cli("--nprocs", "2", "--redirects", "0:3,1:1", "--log-dir", logs, script("hello.py"))
        assert result.returncode == 0, result.stderr
        assert "[0]" not in result.stdout + result.stderr  # rank 0: both streams to its file only
        assert "[1] hello" not in result.stdout and "[1] stderr of rank 1" in result.stderr
        assert "hello" in open(os.path.join(logs, "rank0.log")).read()
        assert "stderr of rank 1" in open(os.path.join(logs, "rank1.log")).read()


def test_redirects_without_a_log_dir_use_one_and_say_where():
    result = run_cli("--nprocs", "2", "--redirects", "3", script("hello.py"))
    assert result.returncode == 0, result.stderr
    where = re.search(r"the ranks' log files go to (\S+)", result.stderr).group(1)
    assert "hello" in open(os.path.join(where, "rank1.log")).read() and "hello" not in result.stdout


def test_no_python_runs_an_executable_and_reads_torchelastics_error_file():
    result = run_cli("--nprocs", "2", "--no-python", script("torch_error_file.sh"))
    assert result.returncode == 3, result.stderr
    assert "shell rank 0 of 2" in result.stdout
    assert "rank 1 on" in result.stderr and "raised RuntimeError: the shell gave up" in result.stderr


def test_module_is_the_long_form_of_dash_m():
    result = run_cli("--nprocs", "1", "--module", "json.tool", "--help")
    assert result.returncode == 0 and "usage" in result.stdout


def test_sigint_is_reported_once_with_one_prefix():
    proc = start_cli("--nprocs", "2", script("fail.py"), "ok", "9")
    try:
        time.sleep(2)
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "distrib-run: received SIGINT" in err and "distrib-run: distrib-run" not in err


def test_no_process_is_left_after_restarts():
    result = run_cli("--nprocs", "2", "--max-restarts", "1", script("flaky.py"), "0", "1")
    assert result.returncode == 0, result.stderr
    children = [p for p in psutil.process_iter(["cmdline"]) if "flaky.py" in " ".join(p.info["cmdline"] or [])]
    assert not children
