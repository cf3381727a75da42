"""What runs in each rank of the all-reduce benchmark: the targets and their timing.

A target is one way to all-reduce: one of our communicators, our dispatcher,
or a peer (``torch.distributed``, PyTorch symmetric memory). For each case
(target, mode, dtype, size) every rank checks the result once, then times it:

- eager: one Python call per all-reduce, each bracketed by CUDA events (on the
  CPU, by the wall clock), as a user's loop would call it;
- graph: ``graph_ops`` all-reduces captured in one CUDA graph, each replay
  bracketed by events, divided by ``graph_ops``.

Every rank runs the cases in the same order; after each case the ranks agree
through the Coordinator on whether it succeeded everywhere, so a case that
fails on one rank is reported as failed rather than leaving the others behind.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
PEERS_GPU = ("torch:nccl", "torch:symm_mem_one_shot", "torch:symm_mem_two_shot")
PEERS_CPU = ("torch:gloo",)


@dataclass
class Prepared:
    """Buffers of one case: fill ``input``, call ``run`` (one all-reduce), read ``output``."""

    run: Callable[[], Any]
    input: torch.Tensor
    output: torch.Tensor


class Target:
    name = ""

    def prepare(self, dtype: torch.dtype, numel: int) -> Prepared:
        raise NotImplementedError

    def declines(self, dtype: torch.dtype, numel: int) -> Optional[str]:
        """Why this target does not take such a tensor by design (a size cap …), or None."""
        return None

    def close(self) -> None:
        pass


class CommunicatorTarget(Target):
    def __init__(self, name: str, comm, device: torch.device):
        self.name, self.comm, self.device = name, comm, device

    def prepare(self, dtype, numel):
        x = torch.empty(numel, dtype=dtype, device=self.device)
        all_reduce = self.comm.all_reduce
        return Prepared(lambda: all_reduce(x), x, x)

    def declines(self, dtype, numel):
        # The same answer on every rank (the contract of can_all_reduce).
        return self.comm.can_all_reduce(torch.empty(numel, dtype=dtype, device=self.device))

    def close(self):
        self.comm.close()


class TorchDistributedTarget(Target):
    """``torch.distributed.all_reduce`` on the default group (nccl on GPUs, gloo on CPUs)."""

    def __init__(self, backend: str, device: torch.device):
        self.name, self.device = f"torch:{backend}", device

    def prepare(self, dtype, numel):
        x = torch.empty(numel, dtype=dtype, device=self.device)
        all_reduce = torch.distributed.all_reduce
        return Prepared(lambda: all_reduce(x), x, x)


class SymmetricMemoryTarget(Target):
    """PyTorch symmetric memory's one-shot or two-shot all-reduce on a symmetric buffer.

    The raw operator on a buffer that is already symmetric: a user with an
    ordinary tensor would first copy it in (vLLM does), which this leaves out.
    """

    def __init__(self, algorithm: str, device: torch.device, max_bytes: int):
        self.name = f"torch:symm_mem_{algorithm}"
        self.algorithm, self.device, self.max_bytes = algorithm, device, max_bytes
        world = torch.distributed.group.WORLD
        assert world is not None  # run_rank made the default process group first
        self.group = world.group_name
        self.buffers: dict = {}

    def _buffer(self, dtype):
        if dtype not in self.buffers:  # collective: every rank reaches it in the same case
            import warnings

            import torch.distributed._symmetric_memory as symm_mem

            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None:  # needed before torch 2.9 or so; a deprecated no-op after
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    enable(self.group)
            buffer = symm_mem.empty(self.max_bytes // torch.empty(0, dtype=dtype).element_size(),
                                    dtype=dtype, device=self.device)
            symm_mem.rendezvous(buffer, self.group)
            self.buffers[dtype] = buffer
        return self.buffers[dtype]

    def prepare(self, dtype, numel):
        view = self._buffer(dtype)[:numel]
        group = self.group
        if self.algorithm == "one_shot":
            out = torch.empty(numel, dtype=dtype, device=self.device)
            op = torch.ops.symm_mem.one_shot_all_reduce_out
            return Prepared(lambda: op(view, "sum", group, out), view, out)
        op = torch.ops.symm_mem.two_shot_all_reduce_
        return Prepared(lambda: op(view, "sum", group), view, view)


# -- the rank's main --------------------------------------------------------------------

def run_rank(config: dict) -> dict:
    """Entry point of each launched rank; returns its measurements and facts."""
    import distrib

    # NVLink multicast stays off whatever the caller's environment says.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    ctx = distrib.init()
    gpu = config["device"] == "cuda"
    # (torch.device takes index None, the current device, which its stub leaves out)
    device = (torch.device("cuda", ctx.device)  # type: ignore[arg-type]
              if gpu else torch.device("cpu"))
    facts: dict = {"rank": ctx.rank, "torch": torch.__version__, "disabled": {}}
    if gpu:
        torch.cuda.set_device(device)
        facts["device_name"] = torch.cuda.get_device_name(device)
        torch.distributed.init_process_group("nccl", device_id=device)
        facts["torch_nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        facts["device_name"] = "CPU"
        torch.distributed.init_process_group("gloo")
    targets = _start_targets(config, ctx, device, facts)
    cases = []
    try:
        for target in targets:
            for dtype_name in config["dtypes"]:
                for mode in config["modes"]:
                    for size in config["sizes"]:
                        cases.append(_measure_case(target, dtype_name, mode, size, config, ctx, device))
    finally:
        for target in targets:
            target.close()
        torch.distributed.destroy_process_group()
    facts["cases"] = cases
    return facts


def _start_targets(config: dict, ctx, device: torch.device, facts: dict) -> list[Target]:
    from ..communicator import DeviceType, Dispatcher, communicators, create
    from ..errors import DistribError

    wanted = config["targets"]
    gpu = device.type == "cuda"
    index = device.index if gpu else None
    targets: list[Target] = []
    kind = DeviceType.CUDA if gpu else DeviceType.CPU
    for name in communicators.names():
        label = f"distrib:{name}"
        if wanted is not None and label not in wanted:
            continue
        try:
            cls = communicators.get(name)
        except DistribError as exc:
            facts["disabled"][label] = str(exc)
            continue
        if getattr(cls, "device_type", None) is not kind:
            continue
        try:  # a one-member Dispatcher agrees across ranks on whether it can start
            starter = Dispatcher(ctx.coordinator, index, order=[name])
            member = starter[name]
            targets.append(CommunicatorTarget(label, member, device))
            if hasattr(member, "nccl_version"):
                facts["distrib_nccl"] = _nccl_version_text(member.nccl_version)
        except DistribError as exc:
            facts["disabled"][label] = str(exc)
    if wanted is None or "distrib:dispatcher" in wanted:
        dispatcher = create(ctx.coordinator, index if gpu else "cpu")
        targets.append(CommunicatorTarget("distrib:dispatcher", dispatcher, device))
        facts["dispatcher_chain"] = [c.name for c in dispatcher.chain]
    peers = PEERS_GPU if gpu else PEERS_CPU
    for name in peers:
        if wanted is not None and name not in wanted:
            continue
        if name.startswith("torch:symm_mem_"):
            reason = _symmetric_memory_unavailable(device)
            reasons = [json.loads(r) for r in ctx.coordinator.all_gather(json.dumps(reason).encode())]
            if any(reasons):
                facts["disabled"][name] = next(r for r in reasons if r)
                continue
            algorithm = name[len("torch:symm_mem_"):]  # one_shot or two_shot
            targets.append(SymmetricMemoryTarget(algorithm, device, max(config["sizes"])))
        else:
            targets.append(TorchDistributedTarget(name.split(":")[1], device))
    return targets


def _symmetric_memory_unavailable(device: torch.device) -> Optional[str]:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"torch.distributed._symmetric_memory does not import: {exc}"
    if not hasattr(torch.ops.symm_mem, "two_shot_all_reduce_"):
        return "this PyTorch has no symm_mem all-reduce operators"
    return None


def _nccl_version_text(code: int) -> str:
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


# -- one case -------------------------------------------------------------------------

def _measure_case(target: Target, dtype_name: str, mode: str, size: int, config: dict, ctx,
                  device: torch.device) -> dict:
    dtype = DTYPES[dtype_name]
    numel = size // torch.empty(0, dtype=dtype).element_size()
    record = {"target": target.name, "mode": mode, "dtype": dtype_name, "size": size, "numel": numel,
              "times_us": [], "host_us": None, "correct": None, "error": None, "declined": None}
    iters = _iterations(config["iters"], size)
    record["declined"] = target.declines(dtype, numel)
    try:
        if record["declined"] is not None:
            raise _Declined
        prepared = target.prepare(dtype, numel)
        if mode == "graph":
            record["correct"] = _check_graph(prepared, ctx.rank, ctx.world_size)
            record["times_us"], record["host_us"] = _time_graph(prepared, iters, config, ctx)
        else:
            record["correct"] = _check_eager(prepared, ctx.rank, ctx.world_size, device)
            record["times_us"], record["host_us"] = _time_eager(prepared, iters, config, ctx, device)
        del prepared
    except _Declined:
        pass
    except Exception as exc:  # noqa: BLE001 — recorded; the ranks agree just below
        text = str(exc).strip().splitlines()
        record["error"] = f"{type(exc).__name__}: {text[0] if text else ''}"
    errors = [json.loads(e) for e in ctx.coordinator.all_gather(json.dumps(record["error"]).encode())]
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        record["error"] = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
        record["times_us"] = []
    return record


class _Declined(Exception):
    """The target declines this case by design: recorded, not timed, not a failure."""


def _iterations(iters: int, size: int) -> int:
    """Fewer iterations for large messages: each already takes long enough to time well."""
    return max(5, min(iters, round(iters * (16 << 20) / max(size, 1))))


def _fill(tensor: torch.Tensor, rank: int) -> None:
    i = torch.arange(tensor.numel(), dtype=torch.int32, device=tensor.device) % 13
    tensor.copy_(i + (rank + 1))


def _expected(numel: int, world_size: int, dtype, device) -> torch.Tensor:
    # Sum over ranks of (i % 13 + r + 1); at most 12 * 8 + 36 = 132, exact in bfloat16.
    i = torch.arange(numel, dtype=torch.int32, device=device) % 13
    return (i * world_size + world_size * (world_size + 1) // 2).to(dtype)


def _check_eager(prepared: Prepared, rank: int, world_size: int, device) -> bool:
    _fill(prepared.input, rank)
    prepared.run()
    _synchronize(device)
    return bool(torch.equal(prepared.output, _expected(prepared.output.numel(), world_size,
                                                       prepared.output.dtype, prepared.output.device)))


def _check_graph(prepared: Prepared, rank: int, world_size: int) -> bool:
    graph = _capture(prepared.run, 1)
    _fill(prepared.input, rank)
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.equal(prepared.output, _expected(prepared.output.numel(), world_size,
                                                prepared.output.dtype, prepared.output.device))
    del graph
    return bool(ok)


def _capture(run: Callable[[], Any], ops: int) -> "torch.cuda.CUDAGraph":
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graph asks
        for _ in range(2):
            run()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ops):
            run()
    return graph


def _time_eager(prepared: Prepared, iters: int, config: dict, ctx, device) -> tuple[list, float]:
    prepared.input.zero_()  # repeated in-place sums of zeros stay finite
    for _ in range(config["warmup"]):
        prepared.run()
    _synchronize(device)
    ctx.coordinator.barrier()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            prepared.run()
            times.append((time.perf_counter() - started) * 1e6)
        return times, sum(times) / len(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    begin = time.perf_counter()
    for start, end in zip(starts, ends):
        start.record()
        prepared.run()
        end.record()
    torch.cuda.synchronize()
    host_us = (time.perf_counter() - begin) / iters * 1e6
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], host_us


def _time_graph(prepared: Prepared, iters: int, config: dict, ctx) -> tuple[list, float]:
    ops = config["graph_ops"]
    prepared.input.zero_()
    graph = _capture(prepared.run, ops)
    for _ in range(max(1, config["warmup"] // 2)):
        graph.replay()
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    begin = time.perf_counter()
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    host_us = (time.perf_counter() - begin) / (iters * ops) * 1e6
    del graph
    return [s.elapsed_time(e) * 1e3 / ops for s, e in zip(starts, ends)], host_us


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
