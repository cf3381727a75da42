"""What each rank runs: build this rank's stage of the sharded model, check the contenders, time them.

Every rank calls :func:`run_rank` with the same config. Contract:

1. the ranks form ``distrib.parallel.layout(tp, pp)`` (``tp`` = ranks / ``pp``):
   TP groups of consecutive ranks, one pipeline group per TP rank; every
   contender (see ``comms.py``) starts on every rank, or is skipped on all;
2. the model is ``--model``, or, where none is named (ranks sharing a GPU),
   the largest that fits; the number of layers is the preset's, or
   ``--layers``, or fewer where GPU memory requires (what fits on every GPU,
   counting every rank on it; see ``fit.py``); both are reported; stage ``s``
   holds layers ``[s L / pp, (s + 1) L / pp)``;
3. checks, before any timing (see ``checks.py``): exact all-reduces, every
   contender's logits against the reference's, optionally against one
   unsplit model; on GPUs, each captured graph's first replay gives its eager
   step's logits;
4. timing of whole decode steps: with stages, one step is every stage in
   turn and the tokens back to the first (see ``model.run_stage``), so a
   step's time is the pipeline's. On GPUs, one CUDA graph per batch size
   holds this rank's part of the step (its layers, both all-reduces per
   layer, the sends and receives between stages, the LM head on the last
   stage), captured largest batch first into one shared memory pool, and
   each replay is timed with CUDA events; where a contender's sends between
   stages cannot be captured (they go through host memory), its eager steps
   are timed with CUDA events instead, and the record says so. On CPUs (no
   CUDA graphs) each eager step is timed with the wall clock. The time of one
   step is the slowest rank's (ranks finish a step together); the record
   keeps the median and the 10th/90th percentiles over ``steps`` steps;
5. memory (GPUs): device memory in use (``cudaMemGetInfo``, so NCCL's and
   CuPy's own allocations count) just before the first capture, after each
   capture, and once every graph is captured and timed (steady), plus
   PyTorch's share (its graph pool); the largest value over the ranks. Graphs of one contender
   are freed (and the contender closed) before the next is captured.

Rank 0 returns the whole record; the other ranks return None.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Optional

import torch

from .checks import CheckFailed, agree, check_against_unsplit, check_contenders
from .comms import Contender, graph_problem, open_contenders
from .fit import Fit, choose, gpus_from
from .model import SHAPES, DecoderWeights, TensorParallelDecoder, decode_inputs, pipeline_stage, run_stage

__all__ = ["CheckFailed", "run_rank"]

MIB = 1 << 20


def run_rank(config: dict) -> Optional[dict]:
    """One rank of the example (see this module's contract); rank 0 returns the record.

    ``config`` is the command line's, the same on every rank (see
    ``examples/tensor_parallel_decode.py``). Raises :class:`CheckFailed` on
    every rank when a check fails.
    """
    import distrib

    gpu = config["device"] == "cuda"
    if gpu:
        # NVLink multicast (NVLS) stays off, as in distrib's all-reduce benchmark.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
    ctx = distrib.init()
    pp = config.get("pp", 1)
    if ctx.world_size % pp:
        raise ValueError(f"--pp {pp} does not divide the {ctx.world_size} ranks of the launch")
    if gpu:
        device = torch.device("cuda", ctx.device if ctx.device is not None else ctx.info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # N ranks share the cores: N x all-cores threads would only fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.info.local_world_size))
    say = _Say(ctx.rank)
    tp = ctx.world_size // pp
    problem = SHAPES[config["model"]].problem_with(tp) if config["model"] else None  # None: chosen by _fit
    if problem is not None:
        raise ValueError(f"--model {config['model']} cannot run on {tp} ranks per stage: {problem}")
    batches = sorted(config["batch_sizes"])

    layout = distrib.parallel.layout(tp=tp, pp=pp, coordinator=ctx.coordinator)
    try:
        contenders, skipped = open_contenders(config["comms"], layout, device, config.get("break_comm"),
                                              config.get("break_handoff"))
        for label, reason in skipped.items():
            say(f"{label}: skipped ({reason})")
        if not contenders:
            raise RuntimeError("no contender could start: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        try:
            return _run(config, layout, device, batches, contenders, skipped, say)
        finally:
            for contender in contenders:
                contender.close()
    finally:
        layout.close()


def _run(config: dict, layout, device: torch.device, batches: list, contenders: list, skipped: dict,
         say) -> Optional[dict]:
    """Build, check, time; the contenders are started and are closed by the caller."""
    world, tp, pp, gpu = layout.world, layout.tp_size, layout.pp_size, device.type == "cuda"
    fit = _fit(config, tp, pp, batches[-1], device, world)  # before any rank builds its part of the model
    shape, layers, layers_note = fit.shape, fit.shape.layers, fit.layers_note
    if fit.model_note:
        say(f"model: {fit.model_note}")
    stage = pipeline_stage(layers, pp, layout.pp_rank)
    stages = ", ".join(_span(pipeline_stage(layers, pp, s).layers) for s in range(pp))
    say(f"{shape.name}: {layers_note}; tp={tp}" + (f", pp={pp} (stage layers {stages})" if pp > 1 else "")
        + f", context {shape.context}, cache {shape.cache_len} slots, batches {batches}, {config['device']}")
    model = TensorParallelDecoder(DecoderWeights(shape, tp, layout.tp_rank, batches[-1], device, config["seed"],
                                                 stage))
    inputs = {b: decode_inputs(shape, b, device, config["seed"]) for b in batches}

    for contender in contenders:
        contender.step = _stepper(model, contender, config.get("compile"))
    if config.get("compile"):
        say(f"decode steps compiled with torch.compile(fullgraph=True, backend={config['compile']!r})"
            + (" (each stage's layers and head; the sends between stages stay eager)" if pp > 1 else ""))
    check, eager_logits = check_contenders(contenders, inputs, layout, shape.hidden, config["check_rtol"], say)
    if config.get("check_tp1"):
        reference = check["reference"]
        check["vs_tp1"] = check_against_unsplit(shape, config["seed"], eager_logits[reference], inputs, layout,
                                                config["check_rtol"], say, reference)
    results: list[dict] = []
    memory: list[dict] = []
    for contender in contenders:
        eager_why = _eager_on_gpu(contender, inputs, stage, world) if gpu else None
        if eager_why:
            contender.details["timing"] = f"eager steps timed with CUDA events, no CUDA graphs: {eager_why}"
        say(f"{contender.label}: " + ("capturing and timing CUDA graphs" if gpu and not eager_why
                                      else "timing eager steps"))
        if gpu and not eager_why:
            times, mem, graph_check = _time_graphs(model, contender, inputs, eager_logits[contender.label],
                                                   config, world, config["check_rtol"])
            check["graph_vs_eager"].extend(graph_check)
            memory.append({"comm": contender.label, **_max_over_ranks(world, mem)})
        else:
            times = _time_steps({b: functools.partial(contender.step, x) for b, x in inputs.items()}, config,
                                world, device)
        for b in batches:
            results.append({"comm": contender.label, "batch": b, **_slowest_rank_stats(world, times[b])})
        # Before the next contender captures. Every rank closes (unmapping its peers'
        # captured buffers) before any rank frees its graph pool: CUDA IPC memory
        # must not be freed while another process still has it open.
        contender.close()
        world.barrier()
        if gpu:
            torch.cuda.empty_cache()
    if world.rank != 0:
        return None
    return {"shape": {**dataclasses.asdict(shape), "head_dim": shape.head_dim, "cache_len": shape.cache_len},
            "layers_note": layers_note, "model_note": fit.model_note, "tp": tp, "pp": pp, "stages": stages,
            "contenders": {c.label: c.details for c in contenders}, "skipped": skipped, "check": check,
            "results": results, "memory": memory, "facts": _facts(device)}


def _stepper(model: TensorParallelDecoder, contender: Contender, backend: Optional[str]):
    """One pipelined decode step with ``contender``'s calls; the stage's part eager or through torch.compile.

    Only the stage's part (layers, all-reduces, head) is compiled: distrib's
    sends and recvs have no PyTorch operators for torch.compile to trace.
    """
    stage, forward = model.weights.stage, model.step
    if backend:
        # One compiled entry per contender and per static/dynamic batch shape: more than
        # Dynamo's default limit when every contender runs, so raise it.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        forward = torch.compile(model.step, fullgraph=True, backend=backend)

    def step(x: torch.Tensor) -> Optional[torch.Tensor]:
        return run_stage(stage, lambda h: forward(h, contender.all_reduce), x, contender.send, contender.recv)

    return step


def _eager_on_gpu(contender: Contender, inputs: dict, stage, world) -> Optional[str]:
    """Why this contender's steps cannot be captured in CUDA graphs on some rank, or None (the same on every rank)."""
    if stage.count == 1:
        return None
    x = inputs[min(inputs)]
    tokens = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)  # what the last stage sends back
    why = graph_problem(contender, [(tokens, 0)] if stage.is_last else [(x, stage.index + 1)])
    reasons = [r.decode() for r in world.all_gather((why or "").encode()) if r]
    return reasons[0] if reasons else None


def _span(layers: range) -> str:
    return str(layers.start) if len(layers) == 1 else f"{layers.start}-{layers.stop - 1}"


# -- the model and layers that fit ------------------------------------------------------

def _fit(config: dict, tp: int, pp: int, max_batch: int, device: torch.device, world) -> Fit:
    """``fit.choose`` on what every rank's GPU has free: the same answer on every rank (CPUs: no limit)."""
    gpus = []
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", device.index)
        here = {"gpu": f"{world.node_rank}/{uuid}", "free": free, "total": total, "rank": world.rank,
                "name": f"GPU {device.index}" + (f" of node {world.node_rank}" if world.nnodes > 1 else "")}
        seen = [json.loads(r) for r in world.all_gather(json.dumps(here).encode())]
        # Ranks that share a GPU count once each on it; rank 0 builds the unsplit model of --check-tp1.
        gpus = gpus_from(seen, unsplit_rank=0 if config.get("check_tp1") else None)
    return choose(SHAPES, config["model"], config.get("layers"), tp, pp, max_batch, gpus)


# -- timing ---------------------------------------------------------------------------

def _time_steps(steps: dict[int, Callable[[], object]], config: dict, coord,
                device: torch.device) -> dict[int, list]:
    """ms per step, per batch size: ``steps[b]()`` runs one (eager or a graph replay).

    On GPUs each step is timed with CUDA events on the current stream; on CPUs
    with the wall clock. ``warmup`` untimed steps first, then a barrier.
    """
    gpu = device.type == "cuda"
    times = {}
    for b, step in steps.items():
        for _ in range(config["warmup"]):
            step()
        if gpu:
            torch.cuda.synchronize(device)
        coord.barrier()
        if gpu:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(config["steps"])]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(config["steps"])]
            for start, end in zip(starts, ends):
                start.record()
                step()
                end.record()
            torch.cuda.synchronize(device)
            times[b] = [s.elapsed_time(e) for s, e in zip(starts, ends)]
            continue
        samples = []
        for _ in range(config["steps"]):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
        times[b] = samples
    return times


def _time_graphs(model, contender: Contender, inputs: dict, eager: dict, config: dict, coord,
                 rtol: float) -> tuple[dict, dict, list]:
    """CUDA-graph replay ms per batch size, the memory record, and the graph-vs-eager check.

    ``eager[b]``: this rank's eager logits, None on a stage before the last
    (whose graphs have no logits to compare; they still replay in step).
    """
    device = model.weights.device
    probe = _MemoryProbe(device)
    pool = torch.cuda.graph_pool_handle()
    graphs: dict = {}
    with contender.capture():  # custom: the captured inputs are registered when this ends
        for b in sorted(inputs, reverse=True):  # largest first: smaller ones reuse its pool blocks
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # eager warm-up (and compilation), off the capture's stream
                for _ in range(2):
                    contender.step(inputs[b])
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = contender.step(inputs[b])
            graphs[b] = (graph, out)
            probe.sample()
    torch.cuda.synchronize(device)
    graph_check = []
    for b, (graph, out) in graphs.items():
        graph.replay()
        torch.cuda.synchronize(device)
        rel, ok = None, True
        if out is not None:
            ref = eager[b].float()
            rel = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            ok = bool(torch.isfinite(out).all()) and rel <= rtol
        ok = agree(coord, ok)
        rel = max(r for r in (json.loads(x) for x in coord.all_gather(json.dumps(rel).encode())) if r is not None)
        graph_check.append({"comm": contender.label, "batch": b, "rel_err": rel, "passed": ok})
        if not ok:
            raise CheckFailed(f"{contender.label}: the CUDA graph of batch {b} does not reproduce its eager "
                              f"step (relative error {rel:.3g} > {rtol:g}); its captured communication is wrong")
    times = _time_steps({b: graphs[b][0].replay for b in sorted(inputs)}, config, coord, device)
    per_step = 2 * len(model.weights.layers) if model.weights.tp > 1 else 0  # a TP group of one skips them
    record = probe.steady(graphs=len(graphs), captured_all_reduces=per_step * len(graphs))
    return times, record, graph_check  # the graphs (and their pool) go with this frame


class _MemoryProbe:
    """Device memory in use around one contender's captures, in MiB relative to just before them."""

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.synchronize(device)
        self.before = self._used()
        self.reserved_before = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.samples: list[int] = []

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        """After each graph's capture: NCCL's per-graph cost shows up here."""
        self.samples.append(self._used())

    def steady(self, **counts) -> dict:
        torch.cuda.synchronize(self.device)
        used = self._used()
        return {**counts, "used_before_mib": self.before / MIB,
                "steady_added_mib": (used - self.before) / MIB,
                "peak_added_mib": (max(self.samples + [used]) - self.before) / MIB,
                "after_each_capture_mib": [(u - self.before) / MIB for u in self.samples],
                "torch_pool_added_mib": (torch.cuda.memory_reserved(self.device) - self.reserved_before) / MIB,
                "torch_peak_reserved_added_mib":
                    (torch.cuda.max_memory_reserved(self.device) - self.reserved_before) / MIB}


# -- agreeing across ranks ---------------------------------------------------------------

def _slowest_rank_stats(coord, samples: list) -> dict:
    """Median and 10th/90th percentiles of the slowest rank's time per step (ms)."""
    runs = [json.loads(r) for r in coord.all_gather(json.dumps(samples).encode())]
    slowest = sorted(max(step) for step in zip(*runs))
    return {"latency_ms": _percentile(slowest, 50), "p10_ms": _percentile(slowest, 10),
            "p90_ms": _percentile(slowest, 90), "steps": len(slowest)}


def _max_over_ranks(coord, record: dict) -> dict:
    """Each field's largest value over the ranks (lists element by element)."""
    records = [json.loads(r) for r in coord.all_gather(json.dumps(record).encode())]
    return {key: ([max(v) for v in zip(*(r[key] for r in records))] if isinstance(value, list)
                  else max(r[key] for r in records)) for key, value in record.items()}


def _percentile(ordered: list, q: float) -> float:
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _facts(device: torch.device) -> dict:
    facts = {"torch": torch.__version__}
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
        try:
            import cupy

            facts["cupy"] = cupy.__version__
        except ImportError:
            facts["cupy"] = None
    else:
        facts["device_name"] = "CPU"
    return facts


class _Say:
    """Progress lines on rank 0's stderr."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, text: str) -> None:
        if self.rank == 0:
            import sys

            print(f"[tp-decode] {text}", file=sys.stderr, flush=True)
