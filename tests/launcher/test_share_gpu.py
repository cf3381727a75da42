"""Ranks sharing one GPU: the launchers' MPS daemon, end to end (``pytest -m gpu``).

The CPU side of the opt-in (argument checks, the daemon's life cycle with a
stand-in binary) is in test_share_gpu_cpu.py.
"""
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

pytestmark = pytest.mark.gpu

MPS_NAMES = ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server")


def _mps_processes() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in MPS_NAMES]


def _sum_on_shared_gpu():
    import torch

    from distrib.communicator import create

    ctx = distrib.init()
    comm = create()
    x = torch.full((4096,), float(ctx.info.rank + 1), device="cuda")
    comm.all_reduce(x)
    torch.cuda.synchronize()
    mps = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    names = [c.name for c in comm.chain]
    comm.close()
    return float(x[0]), ctx.device, mps, names, comm.disabled.get("nccl", "")


@pytest.fixture
def no_mps_before():
    if _mps_processes():
        pytest.skip("an MPS daemon is already running here; these tests start their own")
    yield
    deadline = time.monotonic() + 5
    while _mps_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mps_processes() == [], "the launch left MPS processes behind"


@pytest.mark.parametrize("nprocs", [2, 4])
def test_ranks_on_one_gpu_all_reduce_under_the_launchs_own_mps(nprocs, no_mps_before):
    results = distrib.launch(_sum_on_shared_gpu, nprocs, devices=[0] * nprocs, share_gpu=True,
                             timeout=300)
    total = nprocs * (nprocs + 1) / 2
    for value, device, mps, names, nccl_reason in results:
        assert value == total and device == 0
        assert mps and "distrib-launch-" in mps  # the launch's own daemon, in its scratch directory
        assert names[0] == "custom" and "nccl" not in names
        assert "NCCL refuses two ranks on one GPU" in nccl_reason


def _kill_mps_then_wait():
    import torch

    ctx = distrib.init()
    torch.ones(1, device="cuda")  # a client of the daemon
    ctx.coordinator.barrier()
    if ctx.info.rank == 0:
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == "nvidia-cuda-mps-control":
                proc.kill()
    time.sleep(60)


def test_an_mps_daemon_that_dies_fails_the_launch_naming_mps(no_mps_before):
    started = time.monotonic()
    with pytest.raises(distrib.LaunchError, match="MPS control daemon"):
        distrib.launch(_kill_mps_then_wait, 2, devices=[0, 0], share_gpu=True, timeout=300)
    assert time.monotonic() - started < 40


def test_distrib_run_shares_a_gpu(tmp_path, no_mps_before):
    script = tmp_path / "shared.py"
    script.write_text(textwrap.dedent("""
        import os, torch, distrib
        from distrib.communicator import create
        ctx = distrib.init()
        comm = create()
        x = torch.full((1024,), float(ctx.info.rank + 1), device="cuda")
        comm.all_reduce(x)
        print("sum", float(x[0]), "device", ctx.device, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    """))
    result = subprocess.run([sys.executable, "-m", "distrib.cli", "--nprocs", "4", "--devices", "0,0,0,0",
                             "--share-gpu", str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("sum 10.0 device 0 0") == 4, result.stdout


def test_a_killed_launcher_takes_its_mps_daemon_along(tmp_path, no_mps_before):
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent("""
        import time, distrib

        def work():
            import torch
            torch.ones(1, device="cuda")
            time.sleep(120)

        if __name__ == "__main__":
            distrib.launch(work, 2, devices=[0, 0], share_gpu=True)
    """))
    launcher = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 120
    while len(_mps_processes()) < 2 and time.monotonic() < deadline:  # the daemon and its server
        time.sleep(0.2)
    assert _mps_processes(), "the launch started no MPS daemon"
    time.sleep(2)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 15
    while _mps_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _mps_processes() == [], "the MPS daemon outlived its launcher"
