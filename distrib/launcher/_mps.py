"""The MPS control daemon under which ranks that share a GPU run.

Without MPS, the kernels of processes on one GPU take turns (time slices),
so a custom all-reduce whose blocks wait on a peer process's blocks waits a
whole slice for each step. Under MPS (NVIDIA's Multi-Process Service) their
kernels run at the same time. A launch whose ranks share GPUs uses an MPS
control daemon that is already running, or starts one of its own:

- its pipe and log directories are in the launch's scratch directory, so it
  serves this launch alone, and workers find it through
  ``CUDA_MPS_PIPE_DIRECTORY``;
- it is the launcher's child, in a process group of its own, and dies with
  the launcher (PR_SET_PDEATHSIG), taking its MPS server with it;
- the launch stops it at the end (``quit``, then SIGKILL to its group), also
  when the launch fails; a daemon that exits during the launch fails the
  launch with a message naming MPS.

Where MPS cannot start (no ``nvidia-cuda-mps-control``, no permission), the
launch runs time-sliced and says so in one line.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional

__all__ = ["MpsDaemon", "start_mps"]

CONTROL = "nvidia-cuda-mps-control"
_PIPE_VAR, _LOG_VAR = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
_DEFAULT_PIPE = "/tmp/nvidia-mps"
_START_TIMEOUT = 10.0
_QUIT_TIMEOUT = 5.0


class MpsDaemon:
    """An MPS control daemon this launch started (``owned``) or found running."""

    def __init__(self, pipe_dir: str, process: Optional[subprocess.Popen] = None):
        self.pipe_dir = pipe_dir
        self.process = process
        self.owned = process is not None

    @property
    def env(self) -> dict[str, str]:
        """What a worker needs to reach this daemon."""
        return {_PIPE_VAR: self.pipe_dir}

    def lost(self) -> Optional[str]:
        """Why the daemon this launch started is gone, or None while it runs (cheap)."""
        if self.process is None or self.process.poll() is None:
            return None
        return (f"the MPS control daemon this launch started for ranks sharing a GPU exited "
                f"(code {self.process.returncode}; its log is {os.path.dirname(self.pipe_dir)}/mps-log); "
                "ranks on a shared GPU cannot run without it, so the launch stops")

    def close(self) -> None:
        """Stop the daemon if this launch started it (its MPS server goes with it)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                subprocess.run([shutil.which(CONTROL) or CONTROL], input=b"quit\n",
                               env=_daemon_env(self.pipe_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=_QUIT_TIMEOUT)
                process.wait(timeout=_QUIT_TIMEOUT)
            except (OSError, subprocess.SubprocessError):
                pass
        try:  # whatever is left of its group: the daemon, its server
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def start_mps(scratch: str, note: Callable[[str], None]) -> Optional[MpsDaemon]:
    """An MPS daemon for a launch whose ranks share GPUs, or None (time-sliced; ``note`` says why)."""
    running = _running_daemon()
    if running is not None:
        return MpsDaemon(running)
    control = shutil.which(CONTROL)
    if control is None:
        note(f"{CONTROL} was not found, so ranks sharing a GPU run time-sliced (slower) instead of "
             "under MPS")
        return None
    pipe_dir, log_dir = os.path.join(scratch, "mps-pipe"), os.path.join(scratch, "mps-log")
    os.makedirs(pipe_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, **_daemon_env(pipe_dir), _LOG_VAR: log_dir}
    try:
        process = subprocess.Popen([control, "-f"], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=_terminate_with_parent)
    except OSError as exc:
        note(f"MPS could not start ({exc}), so ranks sharing a GPU run time-sliced (slower)")
        return None
    daemon = MpsDaemon(pipe_dir, process)
    deadline = time.monotonic() + _START_TIMEOUT
    while not os.path.exists(os.path.join(pipe_dir, "control")):
        if process.poll() is not None or time.monotonic() > deadline:
            daemon.close()
            note(f"MPS could not start (see {log_dir}), so ranks sharing a GPU run time-sliced (slower)")
            return None
        time.sleep(0.01)
    return daemon


def _terminate_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the launcher dies (it then stops its server)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _daemon_env(pipe_dir: str) -> dict[str, str]:
    return {_PIPE_VAR: pipe_dir}


def _running_daemon() -> Optional[str]:
    """The pipe directory of an MPS control daemon already serving this environment, if any."""
    pipe_dir = os.environ.get(_PIPE_VAR) or _DEFAULT_PIPE
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return None
    import psutil

    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == CONTROL:
            return pipe_dir
    return None  # a stale pipe from a daemon that is gone
