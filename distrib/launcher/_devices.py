"""How many processes a node runs, and which GPU each one gets (shared by launchers)."""
from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

from .._text import counted
from ..errors import ConfigError

__all__ = ["visible_gpu_count", "usable_cpu_count", "auto_nprocs", "parse_devices", "assign_devices",
           "shares_gpus", "most_ranks_on_a_gpu"]


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
    """``"0,2"`` -> ``(0, 2)``; ``"cpu"`` or ``""`` -> ``()`` (no GPUs). Repeats are kept."""
    text = text.strip()
    if text in ("", "cpu", "none"):
        return ()
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--devices {text!r} is invalid; expected GPU indices like 0,2 or 'cpu'") from None
    if any(d < 0 for d in chosen):
        raise ConfigError(f"--devices {text!r} is invalid; GPU indices are >= 0")
    return chosen


def shares_gpus(device_of: Sequence[Optional[int]]) -> bool:
    """Whether two ranks of ``device_of`` have the same GPU."""
    gpus = [d for d in device_of if d is not None]
    return len(set(gpus)) != len(gpus)


def most_ranks_on_a_gpu(device_of: Sequence[Optional[int]]) -> int:
    """The most ranks of ``device_of`` on one GPU (0 without GPUs)."""
    gpus = [d for d in device_of if d is not None]
    return max((gpus.count(d) for d in set(gpus)), default=0)


def assign_devices(devices: Optional[Sequence[int]], nprocs: int, *, share_gpu: bool = False,
                   world_size: Optional[int] = None, option: str = "--devices",
                   count: str = "{processes} per node", no_gpus: str = "--devices cpu",
                   share: str = "--share-gpu") -> list[Optional[int]]:
    """The GPU index for each local rank (``None``: no GPU).

    ``None`` gives local rank ``r`` GPU ``r`` when GPUs are visible (and
    none at all when they are not); an explicit list must name one distinct
    GPU per process; an empty list means no GPUs. With ``share_gpu``, ranks
    may share GPUs: an explicit list may repeat them, and ``None`` spreads
    ``nprocs`` ranks over the visible GPUs in contiguous groups. Errors name
    things as the caller spells them: ``option`` (the devices argument),
    ``count`` (the process count, with ``{n}`` or ``{processes}``), ``no_gpus`` (how to run
    without GPUs) and ``share`` (the opt-in); the defaults are distrib-run's.
    """
    if devices is not None and len(devices) == 0:
        return [None] * nprocs
    processes = count.format(n=nprocs, processes=counted(nprocs, "process", "processes"))
    gpus = visible_gpu_count()
    if devices is None:
        if gpus == 0:
            if share_gpu:
                raise ConfigError(f"{share} runs ranks on shared GPUs, but no GPU is visible here; "
                                  f"leave {share} out, or {no_gpus}, to run on the CPU")
            return [None] * nprocs
        if share_gpu:
            spread = [rank * gpus // nprocs for rank in range(nprocs)]
            _check_sharing(spread, world_size or nprocs, share)
            return list[Optional[int]](spread)
        if nprocs > gpus:
            raise ConfigError(f"{processes} but only {counted(gpus, 'GPU')} {'is' if gpus == 1 else 'are'} "
                              f"visible; expected at most {gpus}, "
                              f"{share} to run several ranks on one GPU, or {no_gpus} to run without GPUs")
        return list(range(nprocs))
    chosen = list(devices)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in chosen):
        raise ConfigError(f"{option} is invalid; expected non-negative GPU indices")
    if len(chosen) != nprocs:
        raise ConfigError(f"{option} names {counted(len(chosen), 'GPU')} for {processes}; expected one GPU per "
                          "process")
    if len(set(chosen)) != len(chosen) and not share_gpu:
        raise ConfigError(f"{option} repeats a GPU; expected one distinct GPU per process, or add "
                          f"{share} to run several ranks on one GPU")
    if gpus == 0 and share_gpu:
        raise ConfigError(f"{share} runs ranks on shared GPUs, but no GPU is visible here")
    if max(chosen) >= gpus:
        raise ConfigError(f"{option} names GPU {max(chosen)}, but {counted(gpus, 'GPU')} "
                          f"{'is' if gpus == 1 else 'are'} visible here")
    if share_gpu:
        _check_sharing(chosen, world_size or nprocs, share)
    return list[Optional[int]](chosen)


def _check_sharing(chosen: list[int], world_size: int, share: str) -> None:
    """Ranks on a shared GPU talk through the custom all-reduce: it must be able to run."""
    if not shares_gpus(chosen):
        return
    import importlib.util

    from ..communicator._custom_all_reduce import SUPPORTED_WORLD_SIZES

    if importlib.util.find_spec("cupy") is None:
        raise ConfigError(f"{share} needs CuPy: ranks that share a GPU all-reduce through distrib's "
                          "custom kernel (NCCL refuses two ranks on one GPU); install distrib[cuda13] "
                          "(cupy-cuda13x) or distrib[cuda12]")
    if world_size not in SUPPORTED_WORLD_SIZES:
        raise ConfigError(f"{share} with {world_size} ranks: the custom all-reduce that ranks sharing "
                          f"a GPU use runs world sizes {', '.join(map(str, SUPPORTED_WORLD_SIZES))}")
