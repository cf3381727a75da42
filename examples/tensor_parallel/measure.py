"""What each rank runs: build the sharded model, check the contenders agree, time them.

Every rank calls :func:`run_rank` with the same config. Contract:

1. every contender (see ``comms.py``) starts on every rank, or is skipped on all;
2. the number of layers is the preset's, or ``--layers``, or fewer where GPU
   memory requires (the smallest that fits on every rank), and is reported;
3. checks, before any timing (all ranks reach the same verdict; any failure
   raises :class:`CheckFailed` on every rank):

   - each contender's all-reduce of every decode shape ([batch, hidden] bf16,
     small integers, so the sum is exact) equals the exact sum, bit for bit;
   - one eager decode step per contender and batch size gives the same logits
     as the reference contender (torch.distributed when it runs) within
     ``check_rtol`` (relative Frobenius error): differences in reduction
     order and rounding legitimately compound over the layers (about 6% after
     80 layers in a CPU simulation of NCCL's per-hop bf16 rounding against a
     single rounding), while a wrong sum is of order 100%;
   - on GPUs, each captured graph's first replay gives its eager step's logits;

4. timing: on GPUs, one CUDA graph per batch size holds the whole decode step
   (every layer, both all-reduces per layer, the LM head), captured largest
   batch first into one shared memory pool, and each replay is timed with CUDA
   events; on CPUs (no CUDA graphs) each eager step is timed with the wall
   clock. The time of one step is the slowest rank's (ranks finish a step
   together, through its all-reduces); the record keeps the median and the
   10th/90th percentiles over ``steps`` steps;
5. memory (GPUs): device memory in use (``cudaMemGetInfo``, so NCCL's and
   CuPy's own allocations count) just before the first capture, after each
   capture, and once every graph is captured and timed (steady), plus
   PyTorch's share (its graph pool); the largest value over the ranks. Graphs of one contender
   are freed (and the contender closed) before the next is captured.

Rank 0 returns the whole record; the other ranks return None.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import torch

from .comms import Contender, open_contenders
from .model import SHAPES, DecoderWeights, ModelShape, TensorParallelDecoder, decode_inputs

__all__ = ["CheckFailed", "run_rank"]

MIB = 1 << 20
GIB = 1 << 30


class CheckFailed(RuntimeError):
    """The contenders disagree: one of them all-reduced wrongly. Nothing is timed."""


def run_rank(config: dict) -> Optional[dict]:
    """One rank of the example (see this module's contract); rank 0 returns the record.

    ``config`` is the command line's, the same on every rank (see
    ``examples/tensor_parallel_decode.py``). Raises :class:`CheckFailed` on
    every rank when the contenders disagree.
    """
    import distrib

    gpu = config["device"] == "cuda"
    if gpu:
        # NVLink multicast (NVLS) stays off, as in distrib's all-reduce benchmark.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
    ctx = distrib.init()
    coord, rank, tp = ctx.coordinator, ctx.rank, ctx.world_size
    if gpu:
        device = torch.device("cuda", ctx.device if ctx.device is not None else ctx.info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # N ranks share the cores: N x all-cores threads would only fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.info.local_world_size))
    say = _Say(rank)
    shape = SHAPES[config["model"]]
    problem = shape.problem_with(tp)
    if problem is not None:
        raise ValueError(f"--model {shape.name} cannot run on {tp} ranks: {problem}")
    batches = sorted(config["batch_sizes"])

    contenders, skipped = open_contenders(config["comms"], coord, device, config.get("break_comm"))
    for label, reason in skipped.items():
        say(f"{label}: skipped ({reason})")
    if not contenders:
        raise RuntimeError("no contender could start: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    try:
        return _run(config, ctx, device, shape, batches, contenders, skipped, say)
    finally:
        for contender in contenders:
            contender.close()


def _run(config: dict, ctx, device: torch.device, shape: ModelShape, batches: list, contenders: list,
         skipped: dict, say) -> Optional[dict]:
    """Build, check, time; the contenders are started and are closed by the caller."""
    coord, rank, tp, gpu = ctx.coordinator, ctx.rank, ctx.world_size, device.type == "cuda"
    layers, layers_note = _choose_layers(shape, tp, batches[-1], device, coord, config.get("layers"))
    shape = shape.with_layers(layers)
    say(f"{shape.name}: {layers_note}; tp={tp}, context {shape.context}, cache {shape.cache_len} "
        f"slots, batches {batches}, {config['device']}")
    model = TensorParallelDecoder(DecoderWeights(shape, tp, rank, batches[-1], device, config["seed"]))
    inputs = {b: decode_inputs(shape, b, device, config["seed"]) for b in batches}

    for contender in contenders:
        contender.step = _stepper(model, contender, config.get("compile"))
    if config.get("compile"):
        say(f"decode steps compiled with torch.compile(fullgraph=True, backend={config['compile']!r})")
    check, eager_logits = _check(model, contenders, inputs, coord, config["check_rtol"], say)
    if config.get("check_tp1"):
        reference = check["reference"]
        check["vs_tp1"] = _check_against_tp1(shape, config["seed"], eager_logits[reference], inputs, coord,
                                             config["check_rtol"], say, reference)
    results: list[dict] = []
    memory: list[dict] = []
    for contender in contenders:
        say(f"{contender.label}: " + ("capturing and timing CUDA graphs" if gpu else "timing eager steps"))
        if gpu:
            times, mem, graph_check = _time_graphs(model, contender, inputs, eager_logits[contender.label],
                                                   config, coord, config["check_rtol"])
            check["graph_vs_eager"].extend(graph_check)
            memory.append({"comm": contender.label, **_max_over_ranks(coord, mem)})
        else:
            times = _time_eager(model, contender, inputs, config, coord)
        for b in batches:
            results.append({"comm": contender.label, "batch": b, **_slowest_rank_stats(coord, times[b])})
        # Before the next contender captures. Every rank closes (unmapping its peers'
        # captured buffers) before any rank frees its graph pool: CUDA IPC memory
        # must not be freed while another process still has it open.
        contender.close()
        coord.barrier()
        if gpu:
            torch.cuda.empty_cache()
    if rank != 0:
        return None
    return {"shape": {**dataclasses.asdict(shape), "head_dim": shape.head_dim, "cache_len": shape.cache_len},
            "layers_note": layers_note, "tp": tp, "contenders": {c.label: c.details for c in contenders},
            "skipped": skipped, "check": check, "results": results, "memory": memory,
            "facts": _facts(device)}


# -- layers that fit ----------------------------------------------------------------

def _choose_layers(shape: ModelShape, tp: int, max_batch: int, device: torch.device, coord,
                   requested: Optional[int]) -> tuple[int, str]:
    """The layer count to build, and a sentence saying why (the same on every rank)."""
    wanted = requested or shape.layers
    source = f"--layers {requested}" if requested else "all"
    if device.type != "cuda":
        return wanted, f"{wanted} of {shape.layers} layers ({source})"
    per_layer, fixed = shape.bytes_per_rank(tp, max_batch)
    free, total = torch.cuda.mem_get_info(device)
    # Left free for activations, the graphs' pool, NCCL's capture costs and the
    # custom kernel's buffers, of one contender at a time.
    reserve = max(8 * GIB, int(0.06 * total))
    fits = max(0, (free - reserve - fixed) // per_layer)
    fits = min(json.loads(r) for r in coord.all_gather(json.dumps(int(fits)).encode()))
    if fits < 1:
        raise RuntimeError(f"not even one layer of {shape.name} fits: {free / GIB:.1f} GiB free, "
                           f"{per_layer / GIB:.2f} GiB per layer, {reserve / GIB:.1f} GiB kept free")
    if fits >= wanted:
        return wanted, f"{wanted} of {shape.layers} layers ({source})"
    return fits, (f"{fits} of {shape.layers} layers: limited by GPU memory ({free / GIB:.1f} GiB free, "
                  f"{per_layer / GIB:.2f} GiB per layer with its KV cache, {reserve / GIB:.1f} GiB kept free)")


# -- checks ---------------------------------------------------------------------------

def _check(model: TensorParallelDecoder, contenders: list[Contender], inputs: dict, coord, rtol: float,
           say) -> tuple[dict, dict]:
    """The exact all-reduce check and the eager logits comparison (see the module's contract)."""
    rank, tp = coord.rank, coord.world_size
    hidden = model.weights.shape.hidden
    device = model.weights.device
    exact: dict[str, bool] = {}
    for c in contenders:
        ok = True
        for b in inputs:
            i = torch.arange(b * hidden, device=device).remainder_(13).view(b, hidden)
            got = c.all_reduce((i + rank + 1).to(torch.bfloat16))
            # Sum over ranks of (i % 13 + r + 1): at most 12 tp + tp(tp + 1)/2, exact in bf16.
            ok &= bool(torch.equal(got, (i * tp + tp * (tp + 1) // 2).to(torch.bfloat16)))
        exact[c.label] = _agree(coord, ok)
    logits = {c.label: {b: c.step(x) for b, x in inputs.items()} for c in contenders}
    _synchronize(device)
    reference = next((c.label for c in contenders if c.flag == "torch"), contenders[0].label)
    comparisons = []
    for c in contenders:
        if c.label == reference:
            continue
        for b in inputs:
            ref, got = logits[reference][b].float(), logits[c.label][b].float()
            local = {"max_abs_diff": (got - ref).abs().max().item(),
                     "rel_err": ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
                     "finite": bool(torch.isfinite(got).all())}
            everyone = [json.loads(r) for r in coord.all_gather(json.dumps(local).encode())]
            comparisons.append({"comm": c.label, "batch": b,
                                "max_abs_diff": max(e["max_abs_diff"] for e in everyone),
                                "rel_err": max(e["rel_err"] for e in everyone),
                                "finite": all(e["finite"] for e in everyone)})
    check = {"reference": reference, "rtol": rtol, "exact_all_reduce": exact, "logits": comparisons,
             "graph_vs_eager": [], "max_abs_logit": max(v.float().abs().max().item()
                                                        for v in logits[reference].values())}
    bad_exact = [label for label, ok in exact.items() if not ok]
    bad_logits = [c for c in comparisons if not (c["finite"] and c["rel_err"] <= rtol)]
    check["passed"] = not bad_exact and not bad_logits
    for c in comparisons:
        say(f"check {c['comm']} vs {reference}, batch {c['batch']}: max |diff| {c['max_abs_diff']:.4g}, "
            f"relative error {c['rel_err']:.3g} (tolerance {rtol:g})")
    if bad_exact or bad_logits:
        lines = [f"{label}: its all-reduce of a [batch, hidden] bf16 tensor of small integers is not "
                 "the exact sum" for label in bad_exact]
        lines += [f"{c['comm']} vs {reference} at batch {c['batch']}: relative error {c['rel_err']:.3g} > "
                  f"{rtol:g} (max |diff| {c['max_abs_diff']:.4g}{'' if c['finite'] else ', not finite'})"
                  for c in bad_logits]
        raise CheckFailed("logits check FAILED, nothing was timed:\n  " + "\n  ".join(lines))
    say(f"logits check passed: {len(contenders)} contenders, reference {reference}"
        + ("" if comparisons else " (only one contender: nothing to compare)"))
    return check, logits


def _check_against_tp1(shape: ModelShape, seed: int, logits: dict, inputs: dict, coord, rtol: float, say,
                       label: str) -> list[dict]:
    """The TP logits (every rank's vocabulary shard, gathered) against one unsplit model on rank 0."""
    rank = coord.rank
    gathered = {b: coord.all_gather(logits[b].float().cpu().contiguous().numpy().tobytes()) for b in inputs}
    results = []
    if rank == 0:
        device = next(iter(inputs.values())).device
        whole = TensorParallelDecoder(DecoderWeights(shape, 1, 0, max(inputs), device, seed))
        for b, x in inputs.items():
            expected = whole.step(x, lambda t: t).float().cpu()
            split = torch.cat([torch.frombuffer(bytearray(r), dtype=torch.float32).view(b, -1)
                               for r in gathered[b]], dim=-1)
            results.append({"batch": b, "rel_err": ((split - expected).norm()
                                                    / expected.norm().clamp_min(1e-30)).item(),
                            "finite": bool(torch.isfinite(split).all())})
        del whole
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = json.loads(coord.broadcast(json.dumps(results).encode(), src=0))
    bad = [r for r in results if not (r["finite"] and r["rel_err"] <= rtol)]
    for r in results:
        say(f"check {label} (TP={coord.world_size}) vs one unsplit model (TP=1), batch {r['batch']}: "
            f"relative error {r['rel_err']:.3g} (tolerance {rtol:g})")
    if bad:
        raise CheckFailed("logits check against TP=1 FAILED, nothing was timed:\n  " + "\n  ".join(
            f"batch {r['batch']}: relative error {r['rel_err']:.3g} > {rtol:g}" for r in bad))
    return results


def _stepper(model: TensorParallelDecoder, contender: Contender, backend: Optional[str]):
    """One decode step with ``contender``'s all-reduce, eager or through torch.compile."""
    if not backend:
        return lambda x: model.step(x, contender.all_reduce)
    # One compiled entry per contender and per static/dynamic batch shape: more than
    # Dynamo's default limit when every contender runs, so raise it.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    compiled = torch.compile(model.step, fullgraph=True, backend=backend)
    return lambda x: compiled(x, contender.all_reduce)


def _agree(coord, ok: bool) -> bool:
    return all(r == b"1" for r in coord.all_gather(b"1" if ok else b"0"))


# -- timing ---------------------------------------------------------------------------

def _time_eager(model, contender: Contender, inputs: dict, config: dict, coord) -> dict[int, list]:
    """Wall-clock ms per eager step, per batch size (CPU: no CUDA graphs)."""
    times = {}
    for b, x in inputs.items():
        for _ in range(config["warmup"]):
            contender.step(x)
        coord.barrier()
        samples = []
        for _ in range(config["steps"]):
            start = time.perf_counter()
            contender.step(x)
            samples.append((time.perf_counter() - start) * 1e3)
        times[b] = samples
    return times


def _time_graphs(model, contender: Contender, inputs: dict, eager: dict, config: dict, coord,
                 rtol: float) -> tuple[dict, dict, list]:
    """CUDA-graph replay ms per batch size, the memory record, and the graph-vs-eager check."""
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
        ref = eager[b].float()
        rel = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        ok = _agree(coord, bool(torch.isfinite(out).all()) and rel <= rtol)
        rel = max(json.loads(r) for r in coord.all_gather(json.dumps(rel).encode()))
        graph_check.append({"comm": contender.label, "batch": b, "rel_err": rel, "passed": ok})
        if not ok:
            raise CheckFailed(f"{contender.label}: the CUDA graph of batch {b} does not reproduce its eager "
                              f"step (relative error {rel:.3g} > {rtol:g}); its captured all-reduces are wrong")
    times = {}
    for b in sorted(inputs):
        graph = graphs[b][0]
        for _ in range(config["warmup"]):
            graph.replay()
        torch.cuda.synchronize(device)
        coord.barrier()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(config["steps"])]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(config["steps"])]
        for start, end in zip(starts, ends):
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        times[b] = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    record = probe.steady(graphs=len(graphs), captured_all_reduces=2 * model.weights.shape.layers * len(graphs))
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
