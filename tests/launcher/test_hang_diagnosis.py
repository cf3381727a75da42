"""Where is each rank? Heartbeats and stack reports from the launchers."""
from __future__ import annotations

import re
import signal
import socket
import time

import pytest

import distrib
from distrib.errors import DistribTimeoutError, WorkerFailedError

from .conftest import run_cli, script, start_cli, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _report_lines(stderr: str) -> list[str]:
    return [line[len("distrib-run: "):] for line in stderr.splitlines() if line.startswith("distrib-run: ")]


def test_a_coordinator_timeout_shows_where_every_rank_is():
    result = run_cli("--nprocs", "4", script("stuck.py"), "coordinator", timeout=90)
    assert result.returncode != 0
    lines = _report_lines(result.stderr)
    heads = [i for i, line in enumerate(lines) if re.match(r"barrier timed out on rank \d", line)]
    assert len(heads) == 1, result.stderr  # one report, though three ranks timed out
    summary = lines[heads[0] + 1: heads[0] + 3]
    assert re.match(r"\s+ranks 0, 2-3\s+in barrier\s+stuck.py:\d+ in <module>\s+coord.barrier\(timeout=8\)",
                    summary[0]), summary
    assert re.match(r"\s+rank 1\s+in all_gather\s+stuck.py:\d+ in <module>\s+coord.all_gather",
                    summary[1]), summary
    # The stacks below the summary stop at the user's call into distrib, not inside the report.
    assert not any("agent.py" in line for line in lines)


def test_a_rank_holding_the_gil_is_reported_with_its_faulthandler_stack(tmp_path):
    result = run_cli("--nprocs", "2", "--heartbeat-timeout", "1.5", script("stuck.py"), "gil", "5",
                     str(tmp_path), timeout=90)
    assert result.returncode == 0, result.stderr
    lines = _report_lines(result.stderr)
    host = socket.gethostname()
    silent = [line for line in lines if "has sent no heartbeat" in line]
    assert silent and silent[0].startswith(f"rank 1 on {host} has sent no heartbeat for"), lines
    assert not any(line.startswith("rank 0 ") for line in silent)  # rank 0 kept beating
    assert any("from faulthandler" in line for line in lines), lines
    assert any(re.match(r"\s+rank 1\s+in its own code\s+stuck.py:\d+ in hold_the_gil\s+ctypes.PyDLL", line) for line in lines), lines


def test_sigusr1_to_distrib_run_prints_every_rank_and_the_launch_goes_on(tmp_path):
    proc = start_cli("--nprocs", "3", script("stuck.py"), "sleep", "6", str(tmp_path))
    try:
        wait_for(lambda: len(list(tmp_path.glob("*.ready"))) == 3, 60, "the ranks to be in place")
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = _report_lines(err)
    assert "stack dump requested (SIGUSR1). Where each rank is:" in lines, err
    assert any(re.match(r"\s+ranks 0-2\s+in its own code\s+stuck.py:\d+ in nap\s+time.sleep\(seconds\)", line)
               for line in lines), lines
    assert any(re.search(r'File ".*stuck.py", line \d+, in nap', line) for line in lines), lines


def _hang_in_named_place(seconds: float) -> None:
    if distrib.init().rank == 1:
        _waiting_for_godot(seconds)
    time.sleep(seconds)


def _waiting_for_godot(seconds: float) -> None:
    time.sleep(seconds)


def test_a_launch_timeout_says_where_each_rank_was():
    with pytest.raises(DistribTimeoutError) as info:
        distrib.launch(_hang_in_named_place, nprocs=2, args=(60,), timeout=12)
    text = str(info.value)
    assert "launch timed out after 12s; ranks 0-1 were still running" in text
    assert "Where each rank was:" in text
    assert re.search(r"rank 1\s+in its own code\s+test_hang_diagnosis.py:\d+ in _waiting_for_godot", text), text
    assert re.search(r"rank 0\s+in its own code\s+test_hang_diagnosis.py:\d+ in _hang_in_named_place", text), text


def _killed(seconds: float) -> None:
    import os

    if distrib.init().rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)


def test_a_dead_rank_is_reported_at_once_with_its_host():
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        distrib.launch(_killed, nprocs=2, args=(60,), timeout=60)
    assert time.monotonic() - start < 30
    assert info.value.root_cause.rank == 1
    assert f"rank 1 on {socket.gethostname()} was killed by signal SIGKILL" in str(info.value)
