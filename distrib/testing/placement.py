"""Where multi-rank GPU tests put their ranks: a GPU each where there are enough, else shared GPUs."""
from __future__ import annotations

__all__ = ["visible_gpus", "placement", "shares_gpus"]


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without a CUDA build of torch or a GPU)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.version.cuda else 0
    except Exception:  # noqa: BLE001 — no driver
        return 0


def shares_gpus(nprocs: int) -> bool:
    """Whether ``nprocs`` ranks must share GPUs here."""
    return visible_gpus() < nprocs


def placement(nprocs: int) -> dict:
    """:func:`distrib.launch` arguments for ``nprocs`` GPU ranks on this machine.

    One GPU per rank where the machine has that many; otherwise the ranks
    share the visible GPUs in contiguous groups (``share_gpu``), so that a
    test of N ranks runs on a machine with fewer GPUs instead of skipping.
    """
    gpus = visible_gpus()
    if gpus >= nprocs:
        return {"devices": list(range(nprocs))}
    return {"devices": [rank * max(gpus, 1) // nprocs for rank in range(nprocs)], "share_gpu": True}
