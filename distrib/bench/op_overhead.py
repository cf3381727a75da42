"""``python -m distrib.bench op-overhead``: host time of an eager all-reduce through distrib's PyTorch operator.

Compiled code calls distrib's collectives through PyTorch operators
(``torch.ops.distrib.all_reduce_``; see ``distrib/communicator/_ops.py``),
which then make the ordinary eager call. This measures what that detour
costs, against the direct call, in one run: ``--nprocs`` ranks all-reduce a
tensor of ``--size`` bytes (float32, default 1 KiB) back to back,
``--calls`` calls per sample, ``--repeats`` samples per path, the paths
alternating (direct first in even samples, the operator first in odd ones):

- ``direct``: ``comm.all_reduce(x)`` (the dispatcher's eager path);
- ``operator``: ``torch.ops.distrib.all_reduce_.default(x, comm.handle, "sum")``;
- ``compiled`` (``--compiled``): ``torch.compile(lambda x: comm.all_reduce(x), fullgraph=True)``,
  guards and wrappers included (for information).

A sample is the host's wall time of the loop divided by ``--calls`` (on
GPUs the loop only enqueues; the device is synchronised after it, outside the
time). Per path: the median over samples of the slowest rank's time. The
operator path passes when it costs at most ``--limit`` (1.3) times the direct one.
The median of the ratios of adjacent samples is reported beside it: on a
busy machine it drifts less than the ratio of the medians.

Writes ``op-overhead.<device>.np<N>.json`` and ``.md`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from . import _report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench op-overhead",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo; cuda: one GPU per rank, the dispatcher's chain (default cpu)")
    parser.add_argument("--devices", default=None,
                        help="cuda: the GPU of each rank, comma-separated, e.g. 0,1 (default: one GPU per rank)")
    parser.add_argument("--order", default=None,
                        help="communicator names for the dispatcher, comma-separated (default: all, by priority)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per all-reduce, a multiple of 16 (default 1024)")
    parser.add_argument("--calls", type=int, default=2000, help="back-to-back calls per sample (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, help="samples per path, at least 5 (default 7)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per path first (default 200)")
    parser.add_argument("--compiled", action="store_true", help="also time a compiled function (inductor)")
    parser.add_argument("--limit", type=float, default=1.3, help="the largest acceptable operator/direct ratio")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole launch")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    return parser


# -- in each rank -------------------------------------------------------------------------

def run_rank(config: dict) -> dict:
    """Entry point of each launched rank: per-call µs per path and sample, and what ran."""
    import torch

    import distrib
    from distrib import communicator
    from distrib.communicator import _ops

    ctx = distrib.init()
    gpu = config["device"] == "cuda"
    if gpu:
        # (torch.device takes index None, the current device, which its stub leaves out)
        device = torch.device("cuda", ctx.device)  # type: ignore[arg-type]
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    comm = communicator.create(ctx.coordinator, device=ctx.device if gpu else "cpu", order=config["order"])
    x = torch.zeros(config["size"] // 4, dtype=torch.float32, device=device)
    operator, handle = _ops.operator("all_reduce_"), comm.handle
    paths = {"direct": lambda: comm.all_reduce(x),
             "operator": lambda: operator(x, handle, "sum"),
             # What the operator runs, without PyTorch's dispatcher in front: the split of its cost.
             "kernel": lambda: _ops._all_reduce_(x, handle, "sum")}
    if config["compiled"]:
        compiled = torch.compile(lambda t: comm.all_reduce(t), fullgraph=True)
        paths["compiled"] = lambda: compiled(x)
    chosen = comm.communicator_for(x)
    assert chosen is not None  # a member takes x: every path below reduces it
    member = chosen.name

    # Every path must reduce: ones summed over the ranks.
    correct = {}
    for name, call in paths.items():
        x.fill_(1.0)
        call()
        correct[name] = bool((x == ctx.world_size).all())
        x.zero_()  # zeros stay zeros, so timing never overflows
    for call in paths.values():
        for _ in range(config["warmup"]):
            call()
    samples: dict = {name: [] for name in paths}
    names = list(paths)
    for repeat in range(config["repeats"]):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            call, calls = paths[name], config["calls"]
            _synchronize(device)
            ctx.coordinator.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            elapsed = time.perf_counter() - start
            _synchronize(device)
            samples[name].append(elapsed / calls * 1e6)
    comm.close()
    facts = {"torch": torch.__version__, "member": member, "chain": [c.name for c in comm.chain],
             "device_name": torch.cuda.get_device_name(device) if gpu else _cpu_model()}
    return {"samples_us": samples, "correct": correct, **facts}


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or "unknown")
    except OSError:
        return platform.processor() or "unknown"


# -- the launcher's side ------------------------------------------------------------------

def summarize(per_rank: list[dict], limit: float) -> dict:
    """Per path: the median over samples of the slowest rank's µs per call; the operator/direct ratio."""
    paths = {}
    for name in per_rank[0]["samples_us"]:
        slowest = [max(values) for values in zip(*(r["samples_us"][name] for r in per_rank))]
        paths[name] = {"median_us": _report.percentile(slowest, 50), "min_us": min(slowest),
                       "max_us": max(slowest), "samples_us": slowest,
                       "correct": all(r["correct"][name] for r in per_rank)}
    direct = paths["direct"]["median_us"]
    for record in paths.values():
        record["over_direct"] = record["median_us"] / direct
        record["added_us"] = record["median_us"] - direct
    ratio = paths["operator"]["over_direct"]
    # Samples taken one after the other see the same load: their ratios drift less on a busy machine.
    paired = [o / d for o, d in zip(paths["operator"]["samples_us"], paths["direct"]["samples_us"])]
    return {"paths": paths, "operator_over_direct": ratio, "paired_ratio_median": _report.percentile(paired, 50),
            "limit": limit, "passed": ratio <= limit}


def markdown(summary: dict) -> str:
    meta, result = summary["meta"], summary["result"]
    config = meta["config"]
    verdict = "within" if result["passed"] else "OVER"
    lines = [f"# Eager all-reduce through distrib's operator vs the direct call ({meta['device']})", "",
             f"{meta['date']} · commit `{meta['commit']}` · {meta['device_name']} · {meta['cpus_usable']} "
             f"cores · {meta['nprocs']} ranks · Python {meta['python']} · torch {meta['torch']} · "
             f"chain {' > '.join(meta['chain'])}, this size goes to `{meta['member']}`", "",
             f"Host µs per call, {_report.size_text(config['size'])} float32 in place, back to back: "
             f"{config['calls']} calls per sample, {config['repeats']} samples per path (paths alternating); "
             "per sample the slowest rank; the median over samples. `direct`: `comm.all_reduce(x)`; "
             "`operator`: `torch.ops.distrib.all_reduce_.default(x, comm.handle, \"sum\")`, the call "
             "compiled graphs make; `kernel`: `_ops._all_reduce_(x, comm.handle, \"sum\")`, the Python function "
             "the operator runs, called without PyTorch's dispatcher"
             + ("; `compiled`: `torch.compile(lambda x: comm.all_reduce(x), fullgraph=True)`" if "compiled"
                in result["paths"] else "") + ".", "",
             "| path | median µs | min | max | × direct | + µs |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["paths"].items():
        lines.append(f"| `{name}` | {r['median_us']:.2f} | {r['min_us']:.2f} | {r['max_us']:.2f} | "
                     f"{r['over_direct']:.3f} | {r['added_us']:+.2f} |")
    lines += ["", f"operator / direct = **{result['operator_over_direct']:.3f}**, {verdict} the limit of "
                  f"{result['limit']:g} (the median of the ratios of adjacent samples: "
                  f"{result['paired_ratio_median']:.3f})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..launcher import launch
    from .allreduce import git_commit

    args = build_parser().parse_args(argv)
    if args.repeats < 5 or args.calls < 1 or args.size < 16 or args.size % 16 or args.nprocs < 1:
        raise SystemExit("need --repeats >= 5, --calls >= 1, --nprocs >= 1 and --size a positive multiple of 16")
    gpu = args.device == "cuda"
    config = {"device": args.device, "size": args.size, "calls": args.calls, "repeats": args.repeats,
              "warmup": max(0, args.warmup), "compiled": args.compiled,
              "order": [n.strip() for n in args.order.split(",") if n.strip()] if args.order else None}
    print(f"op-overhead benchmark: {args.nprocs} {args.device} ranks, {args.size} bytes", file=sys.stderr)
    devices = [int(d) for d in args.devices.split(",")] if gpu and args.devices else None
    per_rank = launch(run_rank, args.nprocs, args=(config,), devices=devices if gpu else "cpu",
                      share_gpu=bool(devices and len(set(devices)) < len(devices)),
                      start_method="spawn" if gpu else "forkserver", timeout=args.timeout)
    first = per_rank[0]
    meta = {"device": args.device, "nprocs": args.nprocs, "device_name": first["device_name"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit or git_commit(), "host": platform.node(), "python": platform.python_version(),
            "cpus_usable": len(os.sched_getaffinity(0)), "torch": first["torch"], "chain": first["chain"],
            "member": first["member"], "config": config}
    summary = {"meta": meta, "result": summarize(per_rank, args.limit)}
    _report.save(summary, markdown(summary), args.out or Path(tempfile.mkdtemp(prefix="distrib-bench-op-overhead-")),
                 f"op-overhead.{args.device}.np{args.nprocs}")
    wrong = [name for name, r in summary["result"]["paths"].items() if not r["correct"]]
    if wrong:
        print(f"op-overhead: wrong results through {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
