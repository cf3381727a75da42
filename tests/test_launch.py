"""distrib.launch: results, failures, signals, timeouts, orphans."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

import distrib
import workers
from distrib import ConfigError, DistribTimeoutError, LaunchError, WorkerFailedError
from distrib.bench.faults import MARK_VAR, marked_processes

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FAST = dict(start_method="forkserver", timeout=120)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _pids(prefix, ranks):
    return [int(open(f"{prefix}.{r}").read()) for r in ranks]


def _run_script(tmp_path, body, *args, wait=True, env_extra=None, **kw):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    # This checkout's distrib, even where another one is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.path.dirname(TESTS_DIR)]),
           **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def test_results_in_rank_order_with_spawn():
    assert distrib.launch(workers.rank_times, nprocs=8, args=(3,), timeout=120) == \
        [0, 3, 6, 9, 12, 15, 18, 21]


def test_results_in_rank_order_with_forkserver():
    assert distrib.launch(workers.rank_times, nprocs=4, args=(5,), **FAST) == [0, 5, 10, 15]


def test_each_rank_gets_its_launch_info():
    results = distrib.launch(workers.info_and_env, nprocs=3, **FAST)
    infos = [r[0] for r in results]
    assert [i.rank for i in infos] == [0, 1, 2]
    assert [i.local_rank for i in infos] == [0, 1, 2]
    assert len({i.launch_id for i in infos}) == 1 and len({i.secret for i in infos}) == 1
    assert len(infos[0].secret) >= 32
    envs = [r[1] for r in results]
    assert all(e["TORCHELASTIC_USE_AGENT_STORE"] == "True" for e in envs)
    # On a machine without GPUs nothing GPU-related is assigned.
    assert all(e["DISTRIB_DEVICE"] is None for e in envs)
    assert len({r[2] for r in results}) == 3 and os.getpid() not in {r[2] for r in results}


def test_function_defined_in_main_of_a_script(tmp_path):
    code, out, err = _run_script(tmp_path, """
        import distrib

        def work(x):
            ctx = distrib.init()
            if ctx.coordinator.is_local_master():
                pass
            ctx.coordinator.barrier()
            return ctx.info.rank * x

        if __name__ == "__main__":
            print(distrib.launch(work, nprocs=4, args=(3,)))
    """)
    assert code == 0, err
    assert out.strip() == "[0, 3, 6, 9]"


def test_launch_without_main_guard_gets_a_clear_error(tmp_path):
    code, out, err = _run_script(tmp_path, """
        import distrib

        def work():
            return 1

        distrib.launch(work, nprocs=2, timeout=60)
    """)
    assert code != 0
    assert 'if __name__ == "__main__":' in err


def test_failing_rank_is_root_cause_and_others_stop_within_two_seconds(tmp_path):
    prefix = str(tmp_path / "pid")
    with pytest.raises(WorkerFailedError) as err:
        distrib.launch(workers.raise_on, nprocs=4, args=(2, prefix), **FAST)
    caught = time.time()
    exc = err.value
    assert exc.rank == 2 and exc.root_cause.exc_type == "ValueError"
    assert "boom from rank 2" in str(exc) and "(root cause)" in str(exc)
    # the rank's real traceback, down to the raising line
    assert 'raise ValueError(f"boom from rank' in exc.root_cause.traceback
    assert "workers.py" in str(exc)
    # torn down within 2 s of the failure being seen, every other rank gone
    assert caught - exc.root_cause.timestamp < 2.0
    assert all(_gone(p) for p in _pids(prefix, range(4)))


def test_rank_killed_by_a_signal_is_named():
    with pytest.raises(WorkerFailedError) as err:
        distrib.launch(workers.sigkill_on, nprocs=3, args=(1,), **FAST)
    assert err.value.rank == 1 and err.value.root_cause.signal_name == "SIGKILL"
    assert f"rank 1 on {socket.gethostname()} was killed by signal SIGKILL" in str(err.value)


def test_system_exit_and_unpicklable_results_are_failures():
    with pytest.raises(WorkerFailedError, match="SystemExit: 3"):
        distrib.launch(workers.exit_with, nprocs=2, args=(3,), **FAST)
    assert distrib.launch(workers.exit_with, nprocs=2, args=(0,), **FAST) == ["ok", None]
    with pytest.raises(WorkerFailedError, match="cannot be pickled"):
        distrib.launch(workers.return_unpicklable, nprocs=1, **FAST)


def test_timeout_names_the_ranks_still_running():
    start = time.monotonic()
    with pytest.raises(DistribTimeoutError) as err:
        distrib.launch(workers.hang_on, nprocs=3, args=(1,), start_method="forkserver", timeout=5)
    assert err.value.missing == (1,)
    assert "rank 1 was still running" in str(err.value)
    assert time.monotonic() - start < 15


def test_grandchildren_of_a_worker_are_stopped_too(tmp_path):
    prefix = str(tmp_path / "pid")
    with pytest.raises(WorkerFailedError, match="rank 0 gives up"):
        distrib.launch(workers.spawn_grandchild_then_fail, nprocs=2, args=(prefix,), **FAST)
    grandchild = int(open(f"{prefix}.grandchild").read())
    assert _wait_gone([grandchild], 3)


def test_sigkill_of_the_launcher_leaves_nothing_behind(tmp_path):
    # Neither a worker, nor a helper (the store's process, the guardian), nor the scratch folder.
    prefix = str(tmp_path / "pid")
    mark, scratch_parent = uuid.uuid4().hex, tmp_path / "tmp"
    scratch_parent.mkdir()
    proc = _run_script(tmp_path, """
        import sys
        import distrib
        from workers import sleep_forever

        if __name__ == "__main__":
            distrib.launch(sleep_forever, nprocs=3, args=(sys.argv[1],))
    """, prefix, wait=False, env_extra={"TMPDIR": str(scratch_parent), MARK_VAR: mark})
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{prefix}.{r}") for r in range(3)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pids = _pids(prefix, range(3))
    assert [p.name for p in scratch_parent.iterdir()], "the launch should have a scratch folder"
    proc.kill()
    proc.wait()
    assert _wait_gone(pids, 5), [p for p in pids if not _gone(p)]
    deadline = time.monotonic() + 10
    while marked_processes(mark) or list(scratch_parent.iterdir()):
        assert time.monotonic() < deadline, (marked_processes(mark), list(scratch_parent.iterdir()))
        time.sleep(0.05)


def test_ctrl_c_stops_every_worker_and_leaves_no_zombie(tmp_path):
    prefix = str(tmp_path / "pid")
    proc = _run_script(tmp_path, """
        import sys
        import psutil
        import distrib
        from workers import sleep_forever

        if __name__ == "__main__":
            try:
                distrib.launch(sleep_forever, nprocs=3, args=(sys.argv[1],))
            except KeyboardInterrupt:
                pids = {int(open(f"{sys.argv[1]}.{r}").read()) for r in range(3)}
                left = [c.pid for c in psutil.Process().children(recursive=True) if c.pid in pids]
                print("interrupted; workers left:", left)
                sys.exit(130)
    """, prefix, wait=False)
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{prefix}.{r}") for r in range(3)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pids = _pids(prefix, range(3))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; workers left: []" in out
    assert all(_gone(p) for p in pids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(nprocs=0), "nprocs=0 is invalid"),
    (dict(nprocs=2, start_method="fork"), "start_method='fork' is not supported"),
    (dict(nprocs=2, timeout=0), "timeout=0 is invalid"),
    (dict(nprocs=2, devices=[0, 0]), "repeats a GPU|GPUs? (is|are) visible"),
    (dict(nprocs=2, devices=[0]), "names 1 GPU for nprocs=2"),
    (dict(nprocs=1, devices="gpu"), "devices='gpu' is invalid"),
])
def test_bad_arguments_are_rejected_before_anything_starts(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        distrib.launch(workers.rank_times, args=(1,), **kwargs)


def test_cpu_devices_option_runs_without_gpus():
    results = distrib.launch(workers.info_and_env, nprocs=2, devices="cpu", **FAST)
    assert [r[1]["DISTRIB_DEVICE"] for r in results] == [None, None]


def test_non_callable_is_rejected():
    with pytest.raises(ConfigError, match="must be callable"):
        distrib.launch("not a function", nprocs=1)


def test_launch_error_family():
    assert issubclass(WorkerFailedError, distrib.DistribError)
    assert issubclass(DistribTimeoutError, TimeoutError)
    assert issubclass(LaunchError, distrib.DistribError)


def test_args_that_are_not_a_sequence_are_a_config_error():
    with pytest.raises(ConfigError, match=r"args=5 must be a tuple or list .* e\.g\. args=\(5,\)"):
        distrib.launch(workers.rank_times, 2, args=5, devices="cpu")
    with pytest.raises(ConfigError, match="kwargs=.* must be a dict"):
        distrib.launch(workers.rank_times, 2, kwargs=[1], devices="cpu")


def test_an_argument_that_cannot_be_pickled_is_named():
    import threading

    with pytest.raises(ConfigError, match=r"args\[1\] cannot be pickled \(TypeError"):
        distrib.launch(workers.rank_times, 2, args=(1, threading.Lock()), devices="cpu")
    with pytest.raises(ConfigError, match=r"kwargs\['lock'\] cannot be pickled"):
        distrib.launch(workers.rank_times, 2, args=(1,), kwargs={"lock": threading.Lock()}, devices="cpu")
