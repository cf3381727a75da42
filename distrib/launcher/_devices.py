"""How many processes a node runs, and which GPU each one gets (shared by launchers)."""
from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

from ..errors import ConfigError

__all__ = ["visible_gpu_count", "usable_cpu_count", "auto_nprocs", "parse_devices", "assign_devices"]


def visible_gpu_count() -> int:
    """GPUs this process could use, found without initialising CUDA (fork stays safe).

    A host without a GPU driver's device files answers 0 at once, without
    importing torch (which takes a second or more).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    if torch.version.cuda is None:
        return 0
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.device_count()
    finally:
        if previous is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_nprocs(devices: Optional[Sequence[int]]) -> int:
    """``--nprocs auto``: one per chosen GPU, else one per visible GPU, else one per CPU."""
    if devices:
        return len(devices)
    if devices is None:
        gpus = visible_gpu_count()
        if gpus:
            return gpus
    return usable_cpu_count()


def parse_devices(text: str) -> tuple[int, ...]:
    """``"0,2"`` -> ``(0, 2)``; ``"cpu"`` or ``""`` -> ``()`` (no GPUs)."""
    text = text.strip()
    if text in ("", "cpu", "none"):
        return ()
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--devices {text!r} is invalid; expected GPU indices like 0,2 or 'cpu'") from None
    if any(d < 0 for d in chosen):
        raise ConfigError(f"--devices {text!r} is invalid; GPU indices are >= 0")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--devices {text!r} repeats a GPU; expected one distinct GPU per process")
    return chosen


def assign_devices(devices: Optional[Sequence[int]], nprocs: int) -> list[Optional[int]]:
    """The GPU index for each local rank (``None``: no GPU).

    ``None`` gives local rank ``r`` GPU ``r`` when GPUs are visible (and
    none at all when they are not); an explicit list must name one GPU per
    process; an empty list means no GPUs.
    """
    if devices is not None and len(devices) == 0:
        return [None] * nprocs
    count = visible_gpu_count()
    if devices is None:
        if count == 0:
            return [None] * nprocs
        if nprocs > count:
            raise ConfigError(
                f"{nprocs} processes per node but only {count} GPUs are visible; expected at most "
                f"{count}, or --devices cpu to run without GPUs")
        return list(range(nprocs))
    chosen = list(devices)
    if len(chosen) != nprocs:
        raise ConfigError(f"--devices names {len(chosen)} GPUs ({','.join(map(str, chosen))}) for "
                          f"{nprocs} processes per node; expected one GPU per process")
    if max(chosen) >= count:
        raise ConfigError(f"--devices names GPU {max(chosen)}, but {count} GPUs are visible here")
    return chosen
