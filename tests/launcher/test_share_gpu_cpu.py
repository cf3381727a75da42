"""The shared-GPU opt-in on a machine without GPUs: argument checks, and the MPS daemon's
life cycle with a stand-in for ``nvidia-cuda-mps-control`` (the real one runs in test_share_gpu.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import distrib
from distrib.cli import build_parser, options_from
from distrib.errors import ConfigError
from distrib.launcher import _devices
from distrib.launcher._mps import start_mps


@pytest.fixture
def two_gpus_and_cupy(monkeypatch):
    """Pretend this machine has 2 GPUs and CuPy (only the checks run; nothing is launched)."""
    import importlib.util

    monkeypatch.setattr(_devices, "visible_gpu_count", lambda: 2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cupy" else real(name, *a))


def test_a_repeated_gpu_without_the_opt_in_names_the_opt_in(two_gpus_and_cupy):
    with pytest.raises(ConfigError, match="repeats a GPU.*--share-gpu"):
        _devices.assign_devices([0, 0], 2)
    with pytest.raises(ConfigError, match="share_gpu=True"):
        distrib.launch(print, 2, devices=[0, 0])


def test_shared_placements(two_gpus_and_cupy):
    assert _devices.assign_devices([0, 0, 0, 0], 4, share_gpu=True) == [0, 0, 0, 0]
    assert _devices.assign_devices([1, 1], 2, share_gpu=True) == [1, 1]
    # Without a list, the ranks spread over the visible GPUs in contiguous groups.
    assert _devices.assign_devices(None, 8, share_gpu=True) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert _devices.assign_devices(None, 2, share_gpu=True) == [0, 1]
    assert _devices.shares_gpus([0, 0, 1]) and not _devices.shares_gpus([0, 1, None])


def test_world_sizes_the_kernel_cannot_run_are_refused_naming_the_supported_ones(two_gpus_and_cupy):
    with pytest.raises(ConfigError, match="3 ranks.*2, 4, 6, 8"):
        _devices.assign_devices([0, 0, 0], 3, share_gpu=True)
    # Nobody shares a GPU here, so any world size goes.
    assert _devices.assign_devices([0, 1], 2, share_gpu=True, world_size=3) == [0, 1]


def test_sharing_needs_cupy(monkeypatch):
    import importlib.util

    monkeypatch.setattr(_devices, "visible_gpu_count", lambda: 1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    with pytest.raises(ConfigError, match="needs CuPy"):
        _devices.assign_devices([0, 0], 2, share_gpu=True)


def test_sharing_needs_a_gpu():
    if _devices.visible_gpu_count():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        distrib.launch(print, 2, share_gpu=True)
    with pytest.raises(ConfigError, match="devices='cpu'"):
        distrib.launch(print, 2, share_gpu=True, devices="cpu")


def test_the_command_line_opt_in():
    args = build_parser().parse_args(["--nprocs", "4", "--devices", "0,0,0,0", "--share-gpu", "x.py"])
    _, nprocs, options = options_from(args)
    assert (nprocs, options.devices, options.share_gpu) == (4, (0, 0, 0, 0), True)
    _, _, options = options_from(build_parser().parse_args(["--nprocs", "2", "x.py"]))
    assert options.share_gpu is False


# -- the MPS daemon's life cycle, with a stand-in binary ---------------------------------------

FAKE_CONTROL = textwrap.dedent("""\
    #!{python}
    # Stands in for nvidia-cuda-mps-control: "-f" runs the daemon (with a "server" child in its
    # process group) until a client sends "quit" or it gets SIGTERM; otherwise it is a client.
    import os, signal, subprocess, sys, time
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    if sys.argv[1:] == ["-f"]:
        server = subprocess.Popen(["sleep", "300"])
        with open(os.path.join(pipe, "daemon.pids"), "w") as f:
            f.write(f"{{os.getpid()}} {{server.pid}}")
        def stop(*_):
            server.kill()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open(os.path.join(pipe, "control"), "w").close()
        while not os.path.exists(os.path.join(pipe, "quit")):
            time.sleep(0.02)
        stop()
    elif sys.stdin.read().strip() == "quit":
        open(os.path.join(pipe, "quit"), "w").close()
""")


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    control = folder / "nvidia-cuda-mps-control"
    control.write_text(FAKE_CONTROL.format(python=sys.executable))
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return scratch


def _pids(scratch) -> list[int]:
    return [int(p) for p in (scratch / "mps-pipe" / "daemon.pids").read_text().split()]


def _gone(pids, within=5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_the_launchs_daemon_serves_workers_and_is_stopped_with_its_server(fake_mps):
    notes = []
    daemon = start_mps(str(fake_mps), notes.append)
    assert daemon is not None and daemon.owned and notes == []
    assert daemon.env == {"CUDA_MPS_PIPE_DIRECTORY": str(fake_mps / "mps-pipe")}
    pids = _pids(fake_mps)
    assert daemon.lost() is None and all(psutil.pid_exists(p) for p in pids)
    daemon.close()
    assert _gone(pids)


def test_a_daemon_that_dies_is_reported_naming_mps(fake_mps):
    daemon = start_mps(str(fake_mps), print)
    daemon_pid, server_pid = _pids(fake_mps)
    os.kill(daemon_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while daemon.lost() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "MPS control daemon" in (daemon.lost() or "")
    daemon.close()  # what is left of its group (the server) goes too
    assert _gone([server_pid])


def test_without_mps_the_launch_runs_time_sliced_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control anywhere
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    notes = []
    assert start_mps(str(tmp_path), notes.append) is None
    assert len(notes) == 1 and "time-sliced" in notes[0]


def test_a_killed_launcher_takes_its_daemon_along(fake_mps):
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from distrib.launcher._mps import start_mps
        assert start_mps({str(fake_mps)!r}, print) is not None
        print("started", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "started"
    pids = _pids(fake_mps)
    launcher.kill()
    launcher.wait()
    assert _gone(pids), "the daemon or its server outlived the launcher"
