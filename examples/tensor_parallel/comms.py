"""The three ways the example communicates, behind one small record.

- ``dispatcher``: distrib's dispatcher (custom P2P kernel, then NCCL through
  CuPy; gloo on CPU);
- ``nccl``: distrib's NCCL-through-CuPy communicator alone (GPU only);
- ``torch``: ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), the outside
  peer: ``all_reduce`` on the TP group (the default process group when there
  is one stage), ``send``/``recv`` between stages.

Each all-reduces within this rank's TP group and, with pipeline stages,
sends and receives within its pipeline group (for distrib, one communicator
per group, made by ``distrib.communicator.create(group)``; which backend
runs a send is the dispatcher's business).

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

__all__ = ["COMM_FLAGS", "Contender", "graph_problem", "open_contenders"]

COMM_FLAGS = ("dispatcher", "nccl", "torch")  # also the order they are checked and timed in


@dataclass
class Contender:
    """One way to communicate: ``all_reduce(t)`` returns the sum of ``t`` over the TP group.

    With pipeline stages, ``send(t, dst)`` and ``recv(t, src)`` (which fills
    ``t`` and returns it) move tensors between the ranks of this rank's
    pipeline group, by stage index; None with one stage. ``capture()`` must
    surround the CUDA-graph captures of its calls (collective when it ends);
    ``close()`` releases it (not a collective).
    """

    flag: str    # the --comm value
    label: str   # as reported: distrib:dispatcher, distrib:nccl, torch:nccl, torch:gloo
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    send: Optional[Callable[[torch.Tensor, int], None]] = None
    recv: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
    capture: Callable[[], ContextManager] = contextlib.nullcontext
    release: Optional[Callable[[], None]] = None
    details: dict = field(default_factory=dict)  # chain, versions, left-out members and why
    pipeline: object = None  # distrib's communicator of the pipeline group, if any (see graph_problem)
    step: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None  # one decode step with these

    def close(self) -> None:
        """Release the communicator (once; later calls do nothing)."""
        release, self.release = self.release, None
        if release is not None:
            release()


def open_contenders(flags: list[str], layout, device: torch.device, broken: Optional[str] = None,
                    broken_handoff: Optional[str] = None) -> tuple[list[Contender], dict[str, str]]:
    """Start the contenders named by ``flags`` on ``layout``'s groups (collective: same flags on every rank).

    ``layout`` is ``distrib.parallel.layout(tp, pp)``'s. Returns the started
    ones in :data:`COMM_FLAGS` order and, for those that could not start on
    every rank, label -> reason. Testing aids (the logits check must then
    fail): ``broken`` names a contender whose all-reduce returns its input
    unreduced; ``broken_handoff`` one whose sends between stages send zeros.
    """
    from distrib import CommunicatorError, communicator

    gpu = device.type == "cuda"
    groups = (layout.tp, layout.pp) if layout.pp_size > 1 else (layout.tp,)
    started: list[Contender] = []
    skipped: dict[str, str] = {}
    for flag in (f for f in COMM_FLAGS if f in flags):
        if flag == "torch":
            started.append(_torch_contender(device, layout))
            continue
        label = f"distrib:{flag}"
        if flag == "nccl" and not gpu:
            skipped[label] = "distrib's NCCL communicator needs CUDA devices; this run is on the CPU"
            continue
        comms, failures = [], []
        for group in groups:  # every rank tries every one of its groups: each create is collective there
            try:
                comms.append(communicator.create(group, device=device.index if gpu else "cpu",
                                                 order=["nccl"] if flag == "nccl" else None))
            except CommunicatorError as exc:
                failures.append(f"{group.describe()}: {exc}")
        # A group agrees with itself; the launch must agree too, or the TP groups
        # that did start would wait in their steps for stages that did not.
        everyone = [r.decode() for r in layout.world.all_gather("; ".join(failures).encode()) if r]
        if everyone:
            for comm in comms:
                comm.close()
            skipped[label] = "; ".join(dict.fromkeys(everyone))
            continue
        started.append(_distrib_contender(flag, label, *comms))
    for contender in started:
        if layout.tp_size == 1:
            # Nothing to sum over one rank; skipped, as frameworks do (vLLM's GroupCoordinator),
            # and a one-rank group may have no communicator a CUDA graph can capture.
            contender.all_reduce = _unreduced
            contender.details["tp"] = "TP groups of one rank: the all-reduce is skipped"
        if contender.flag == broken:
            contender.all_reduce = _unreduced
            contender.details["broken"] = "all-reduce replaced by a no-op (--break-comm)"
        if contender.flag == broken_handoff and contender.send is not None:
            contender.send = _sending_zeros(contender.send)
            contender.details["broken"] = "sends between stages send zeros (--break-handoff)"
    return started, skipped


def graph_problem(contender: Contender, sends: list[tuple[torch.Tensor, int]]) -> Optional[str]:
    """Why this rank's sends between stages (tensor, peer stage) cannot be captured in a CUDA graph, or None.

    Asked of distrib's pipeline communicator: a send it would run through
    host memory (gloo staging a GPU tensor) cannot be captured. torch.distributed's
    NCCL sends are taken as capturable.
    """
    comm = contender.pipeline
    if comm is None:
        return None
    for t, peer in sends:
        member = comm.communicator_for(t, collective="send", peer=peer)
        if member is None:
            return f"no communicator of the pipeline group takes a {t.dtype} send on {t.device}"
        if getattr(member, "stages_cuda", False):
            return (f"the pipeline group's sends of GPU tensors go through {member.name}, by host memory, "
                    "which a CUDA graph cannot capture")
    return None


def _unreduced(t: torch.Tensor) -> torch.Tensor:
    return t


def _sending_zeros(send: Callable[[torch.Tensor, int], None]) -> Callable[[torch.Tensor, int], None]:
    return lambda t, dst: send(torch.zeros_like(t), dst)


def _distrib_contender(flag: str, label: str, comm, pipeline=None) -> Contender:
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t, out=torch.empty_like(t))

    details: dict = {"chain": [c.name for c in comm.chain]}
    if comm.disabled:
        details["left_out"] = dict(comm.disabled)
    nccl = next((c for c in comm.chain if c.name == "nccl"), None)
    if nccl is not None and hasattr(nccl, "nccl_version"):
        v = nccl.nccl_version
        details["nccl"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    if pipeline is None:
        return Contender(flag, label, all_reduce, capture=comm.capture, release=comm.close, details=details)
    details["pipeline_chain"] = [c.name for c in pipeline.chain]
    if pipeline.disabled:
        details["pipeline_left_out"] = dict(pipeline.disabled)

    @contextlib.contextmanager
    def capture():
        with comm.capture(), pipeline.capture():
            yield

    def release() -> None:
        pipeline.close()
        comm.close()

    return Contender(flag, label, all_reduce, send=pipeline.send, recv=pipeline.recv, capture=capture,
                     release=release, details=details, pipeline=pipeline)


def _torch_contender(device: torch.device, layout) -> Contender:
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
    tp_group = None  # the default group: the TP group is the world
    if layout.tp_size < layout.world.world_size:
        # new_group is collective over the world: every rank makes every TP group,
        # in the same order (TP groups are consecutive ranks, see distrib.parallel).
        tp = layout.tp_size
        for first in range(0, layout.world.world_size, tp):
            group = dist.new_group(list(range(first, first + tp)))
            if first == layout.tp.ranks[0]:
                tp_group = group
    stages = layout.pp.ranks  # global ranks, by stage index
    if layout.pp_size > 1:
        details["groups"] = ("all_reduce on a new_group per TP group; send/recv between stages on the default "
                             "group, by global rank")

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=tp_group)
        return t

    def send(t: torch.Tensor, dst: int) -> None:
        dist.send(t, dst=stages[dst])

    def recv(t: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(t, src=stages[src])
        return t

    pipelined = layout.pp_size > 1
    return Contender("torch", f"torch:{backend}", all_reduce, send=send if pipelined else None,
                     recv=recv if pipelined else None, release=dist.destroy_process_group, details=details)
