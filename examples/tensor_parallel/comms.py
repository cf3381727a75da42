"""The three ways the example all-reduces, behind one small record.

- ``dispatcher``: distrib's dispatcher (custom P2P kernel, then NCCL through
  CuPy; gloo on CPU);
- ``nccl``: distrib's NCCL-through-CuPy communicator alone (GPU only);
- ``torch``: ``torch.distributed.all_reduce`` on the default process group
  (NCCL on GPUs, gloo on CPUs), the outside peer.

distrib's communicators are called out of place (``all_reduce(x, out=y)``):
inside a CUDA graph that lets the custom kernel read the captured tensor
directly, with no copy into its own buffer (see ``distrib/communicator/custom.py``).
torch.distributed is called in place, as its users do.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

__all__ = ["COMM_FLAGS", "Contender", "open_contenders"]

COMM_FLAGS = ("dispatcher", "nccl", "torch")  # also the order they are checked and timed in


@dataclass
class Contender:
    """One way to all-reduce: ``all_reduce(t)`` returns the sum of ``t`` over the ranks.

    ``capture()`` must surround the CUDA-graph captures of its all-reduces
    (collective when it ends); ``close()`` releases it (not a collective).
    """

    flag: str    # the --comm value
    label: str   # as reported: distrib:dispatcher, distrib:nccl, torch:nccl, torch:gloo
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    capture: Callable[[], ContextManager] = contextlib.nullcontext
    release: Optional[Callable[[], None]] = None
    details: dict = field(default_factory=dict)  # chain, versions, left-out members and why
    step: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # one decode step with this all-reduce

    def close(self) -> None:
        """Release the communicator (once; later calls do nothing)."""
        release, self.release = self.release, None
        if release is not None:
            release()


def open_contenders(flags: list[str], coordinator, device: torch.device,
                    broken: Optional[str] = None) -> tuple[list[Contender], dict[str, str]]:
    """Start the contenders named by ``flags`` (collective: same flags on every rank).

    Returns the started ones in :data:`COMM_FLAGS` order and, for those that
    could not start here, label -> reason. ``broken`` names a contender whose
    all-reduce is replaced by one that returns its input unreduced (a testing
    aid: the logits check must then fail).
    """
    from distrib import CommunicatorError, communicator

    gpu = device.type == "cuda"
    started: list[Contender] = []
    skipped: dict[str, str] = {}
    for flag in (f for f in COMM_FLAGS if f in flags):
        if flag == "torch":
            started.append(_torch_contender(device))
            continue
        label = f"distrib:{flag}"
        if flag == "nccl" and not gpu:
            skipped[label] = "distrib's NCCL communicator needs CUDA devices; this run is on the CPU"
            continue
        try:  # collective; a failure is agreed by every rank, so all skip it alike
            comm = communicator.create(coordinator, device=device.index if gpu else "cpu",
                                       order=["nccl"] if flag == "nccl" else None)
        except CommunicatorError as exc:
            skipped[label] = str(exc)
            continue
        started.append(_distrib_contender(flag, label, comm))
    for contender in started:
        if contender.flag == broken:
            contender.all_reduce = _unreduced
            contender.details["broken"] = "all-reduce replaced by a no-op (--break-comm)"
    return started, skipped


def _unreduced(t: torch.Tensor) -> torch.Tensor:
    return t


def _distrib_contender(flag: str, label: str, comm) -> Contender:
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t, out=torch.empty_like(t))

    details: dict = {"chain": [c.name for c in comm.chain]}
    if comm.disabled:
        details["left_out"] = dict(comm.disabled)
    nccl = next((c for c in comm.chain if c.name == "nccl"), None)
    if nccl is not None and hasattr(nccl, "nccl_version"):
        v = nccl.nccl_version
        details["nccl"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return Contender(flag, label, all_reduce, comm.capture, comm.close, details)


def _torch_contender(device: torch.device) -> Contender:
    import torch.distributed as dist

    # env:// reads MASTER_ADDR/PORT, RANK and WORLD_SIZE; under distrib's launchers
    # the store is the launcher's (an agent store, as under torchrun).
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method="env://", device_id=device)
        details = {"nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    else:
        dist.init_process_group("gloo", init_method="env://")
        details = {}
    backend = dist.get_backend()

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    return Contender("torch", f"torch:{backend}", all_reduce, contextlib.nullcontext,
                     dist.destroy_process_group, details)
