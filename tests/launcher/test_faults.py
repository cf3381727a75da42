"""Faults at any moment: teardown reaches every worker whatever stage it is in, and a
launch listens on no address it does not need.

The fast part of the fault suite; ``python -m distrib.bench faults`` repeats every
scenario many times (races show up only by repetition).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import distrib
import workers
from distrib import WorkerFailedError
from distrib.bench.faults import MARK_VAR, marked_processes
from distrib.launcher._process import stop_processes

from .conftest import REPO, alive, child_env, run_cli, script, wait_for

pytestmark = pytest.mark.timeout(120)

LOOPBACK = {"127.0.0.1", "::1"}


class _Child:
    """A subprocess.Popen as stop_processes sees it."""

    def __init__(self, code: str, **kw):
        self.process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], **kw)
        self.pid = self.process.pid

    def poll(self):
        return self.process.poll()


def test_stop_reaches_a_worker_that_does_not_lead_its_group_yet():
    # A worker still starting is in the launcher's group; a signal to "its" group misses it.
    child = _Child("""
        import os, time
        time.sleep(0.5)
        os.setpgrp()
        time.sleep(60)
    """)
    try:
        started = time.monotonic()
        stop_processes([child], grace=5.0)
        assert child.process.returncode == -signal.SIGTERM  # SIGTERM, not the grace's SIGKILL
        assert time.monotonic() - started < 2.0
    finally:
        if child.process.poll() is None:
            child.process.kill()


def test_stop_kills_what_ignores_sigterm_after_the_grace_and_the_group_with_it(tmp_path):
    pidfile = tmp_path / "grandchild"
    child = _Child(f"""
        import os, signal, subprocess, sys, time
        os.setpgrp()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open({str(pidfile)!r}, "w").write(str(grandchild.pid))
        time.sleep(60)
    """)
    try:
        wait_for(pidfile.exists, 30, "the grandchild to start")
        wait_for(lambda: os.getpgid(child.pid) == child.pid, 10, "the child to lead its group")
        grandchild = int(pidfile.read_text())
        started = time.monotonic()
        stop_processes([child], grace=0.5)
        assert child.process.returncode == -signal.SIGKILL
        assert 0.5 <= time.monotonic() - started < 3.0
        wait_for(lambda: not alive(grandchild), 5, "the grandchild to be killed with its group")
    finally:
        if child.process.poll() is None:
            child.process.kill()


def _launch_script(body: str, tmp_path, *, timeout: float = 120):
    path = tmp_path / "launch.py"
    path.write_text(textwrap.dedent(body))
    env = child_env({"PYTHONPATH": os.pathsep.join([str(REPO), os.path.dirname(os.path.dirname(__file__))])})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(tmp_path))
    return proc, time.monotonic() - started


@pytest.mark.slow
def test_a_rank_that_dies_while_the_others_start_stops_the_launch_at_once(tmp_path):
    # The case: rank 0 ends before ranks 1-2 have finished starting; they sleep 60 s.
    # Whole process, exit included (multiprocessing joins leftover workers at exit).
    # Before the fix, one run in a few took the full 60 s. bench `faults` repeats it 100 times.
    for attempt in range(4):
        proc, seconds = _launch_script("""
            import distrib, workers
            if __name__ == "__main__":
                distrib.launch(workers.exit_early_on_rank0, nprocs=3, args=(7,))
        """, tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert re.search(r"rank 0 .*exited with code 7 \(root cause\)", proc.stderr), proc.stderr
        assert seconds < 20, f"run {attempt}: the launch took {seconds:.1f}s to end"
        # Ranks are stopped before the launch's scratch folder goes: no rank misses its files.
        assert "No such file" not in proc.stderr, proc.stderr


def test_a_failure_importing_the_function_names_the_rank_and_the_exception(monkeypatch):
    import fault_module

    monkeypatch.setenv("DISTRIB_TEST_IMPORT_FAULT", "1")
    with pytest.raises(WorkerFailedError) as info:
        distrib.launch(fault_module.work, nprocs=2, timeout=120)
    text = str(info.value)
    assert re.search(r"rank 0 .*ImportError: rank 0 cannot import this module today", text), text
    assert "fault_module.py" in text  # its traceback


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_then_ends_it_by_sigterm(tmp_path):
    pids = tmp_path / "pids"
    path = tmp_path / "launch.py"
    path.write_text(textwrap.dedent(f"""
        import distrib, workers
        if __name__ == "__main__":
            distrib.launch(workers.sleep_forever, nprocs=2, args=({str(pids)!r},))
    """))
    env = child_env({"PYTHONPATH": os.pathsep.join([str(REPO), os.path.dirname(os.path.dirname(__file__))])})
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_for(lambda: all(os.path.exists(f"{pids}.{r}") for r in range(2)), 60, "both ranks to start")
        rank_pids = [int(open(f"{pids}.{r}").read()) for r in range(2)]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGTERM
        assert time.monotonic() - started < 5
        assert not any(alive(p) for p in rank_pids)
    finally:
        if proc.poll() is None:
            proc.kill()


def _unexpected(addresses, allowed):
    return sorted(set(addresses) - set(allowed))


@pytest.mark.slow
def test_distrib_launch_listens_on_loopback_only():
    records = distrib.launch(workers.listening_sockets, nprocs=2, timeout=120)
    assert records[0]["launcher"], "the launcher's store should be listening"
    for rank, record in enumerate(records):
        assert not _unexpected(record["rank"] + record["launcher"], LOOPBACK), (rank, record)


@pytest.mark.slow
def test_distrib_run_listens_on_loopback_only():
    done = run_cli("--nprocs", "2", script("listening.py"), timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(r) for r in re.findall(r"^\[\d\] RESULT (.*)$", done.stdout, re.M)]
    assert len(records) == 2
    assert any(r["launcher_listens"] for r in records), "distrib-run's store should be listening"
    for record in records:
        assert not _unexpected(record["rank_listens"] + record["launcher_listens"], LOOPBACK), record


@pytest.mark.slow
@pytest.mark.parametrize("kind, stage, reason", [
    ("os_exit", "start", r"exited with code 7"),
    ("sigkill", "all_gather", r"killed by signal SIGKILL"),
])
def test_distrib_run_stops_at_once_when_a_rank_dies(tmp_path, kind, stage, reason):
    # The bench's faulting program: rank 0 faults, the others would wait 60 s.
    from distrib.bench import _fault_rank

    mark = uuid.uuid4().hex
    started = time.monotonic()
    done = run_cli("--nprocs", "3", _fault_rank.__file__, timeout=120,
                   env={"DISTRIB_FAULT_DIR": str(tmp_path), "DISTRIB_FAULT_KIND": kind,
                        "DISTRIB_FAULT_STAGE": stage, MARK_VAR: mark})
    assert time.monotonic() - started < 30, done.stderr
    assert re.search(rf"rank 0 .*{reason}.*\[root cause\]", done.stderr), done.stderr
    # Every process of the launch is gone (a rank stopped early may not have written its pid).
    assert not marked_processes(mark)


def test_a_stack_request_that_reaches_a_rank_after_it_let_go_of_faulthandler_is_harmless(tmp_path):
    # Under load the monitor can see an exiting rank go quiet and ask faulthandler for its
    # stacks just as the interpreter unregisters it: that request must not kill the rank
    # (it did, "killed by signal 40", failing a launch whose ranks had all returned).
    stack_file = tmp_path / "stacks"
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import faulthandler, os, time
        from distrib.control import agent
        from distrib.control.stacks import DUMP_SIGNAL
        agent._register_faulthandler({str(stack_file)!r})
        os.kill(os.getpid(), DUMP_SIGNAL)
        time.sleep(0.2)
        faulthandler.unregister(DUMP_SIGNAL)  # as at interpreter exit
        os.kill(os.getpid(), DUMP_SIGNAL)
        time.sleep(0.2)
    """)], env=child_env(), capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, (child.returncode, child.stderr)
    assert "File " in stack_file.read_text()  # the request before it did dump the stacks
