"""The custom all-reduce kernels of two revisions, side by side in the same processes.

    python -m distrib.bench kernel-ab --base 4d3ecc6~1 --nprocs 8 4 2 --out benchmarks/results/1xH200

``--base`` is a git revision; its ``kernels/`` are compared with the working
tree's, each with fail-stop compiled in and out: four communicators per rank,
measured alternately round after round (so that drift hits all alike). Per
size and mode (a CUDA-graph replay of 50 all-reduces, or 200 eager calls),
the record keeps every variant's median per-call time and, per rank, the
median over rounds of head / base and of fail-stop / without. Every replay's
and every eager call's result is checked exactly (inputs are rank + 1).

Ranks get a GPU each where there are enough, else share the GPUs. Writes
kernel-ab-<algorithm>.json and a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import distrib

from ..testing.placement import placement, visible_gpus
from . import _report
from ._alternate import median_round_ratio, time_in_turns
from .failstop import _commit, _gpu_name

KERNEL_FILES = ("custom_all_reduce.cu", "custom_all_reduce.cuh")
VARIANTS = (("base", True), ("base", False), ("head", True), ("head", False))


def _name(variant) -> str:
    kernels, fail_stop = variant
    return f"{kernels}{'' if fail_stop else ' without fail-stop'}"


def _export(revision: str, folder: Path) -> str:
    """Write ``revision``'s kernel sources into ``folder``; its short hash."""
    try:
        short = subprocess.run(["git", "rev-parse", "--short", revision], capture_output=True, text=True,
                               check=True).stdout.strip()
        for name in KERNEL_FILES:
            source = subprocess.run(["git", "show", f"{revision}:kernels/{name}"], capture_output=True,
                                    check=True).stdout
            (folder / name).write_bytes(source)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"kernel-ab: cannot read kernels/ at {revision!r} from git: {exc}") from None
    return short


def _worker(base_dir: str, algorithm: str, sizes: list, rounds: int, ops: int, eager_calls: int) -> list:
    import torch

    import distrib.communicator._custom_all_reduce as engine
    from distrib.communicator.custom import CustomAllReduceCommunicator

    ctx = distrib.init()
    rank, world = ctx.info.rank, ctx.info.world_size
    head_dir = engine.kernel_source_dir
    comms = {}
    try:
        for variant in VARIANTS:
            kernels, fail_stop = variant
            # The kernels are compiled (and their digest agreed on) as the communicator is made.
            engine.kernel_source_dir = head_dir if kernels == "head" else (lambda: Path(base_dir))
            comms[variant] = CustomAllReduceCommunicator(ctx.coordinator, ctx.device, algorithm=algorithm,
                                                         max_bytes=max(sizes), fail_stop=fail_stop)
    finally:
        engine.kernel_source_dir = head_dir
    expect = float(world * (world + 1) // 2)
    rows = []
    for nbytes in sizes:
        x = torch.full((nbytes // 2,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        outs = [torch.empty_like(x) for _ in range(ops)]
        times, wrong = time_in_turns(ctx, comms, x, outs, rounds, eager_calls, expect=expect)

        def ratio(mode, a, b):
            return median_round_ratio(times[(mode, a)], times[(mode, b)])

        for mode in ("graph", "eager"):
            rows.append({"bytes": nbytes, "mode": mode, "rounds": rounds, "wrong": wrong[mode],
                         "median_us": {_name(v): statistics.median(times[(mode, v)]) for v in VARIANTS},
                         "head / base": ratio(mode, ("head", True), ("base", True)),
                         "head / base, without fail-stop": ratio(mode, ("head", False), ("base", False)),
                         "fail-stop / without, base": ratio(mode, ("base", True), ("base", False)),
                         "fail-stop / without, head": ratio(mode, ("head", True), ("head", False))})
    for comm in comms.values():
        comm.check()
        comm.close()
    return rows


RATIOS = ("head / base", "head / base, without fail-stop", "fail-stop / without, base",
          "fail-stop / without, head")


def _summary(per_rank: list) -> list:
    """Per row: the slowest rank's median per variant, and each ratio per rank."""
    return [{"bytes": r["bytes"], "mode": r["mode"], "rounds": r["rounds"],
             "wrong": sum(p[i]["wrong"] for p in per_rank),
             "slowest_rank_us": {k: max(p[i]["median_us"][k] for p in per_rank) for k in r["median_us"]},
             "ratios_per_rank": {k: [p[i][k] for p in per_rank] for k in RATIOS}}
            for i, r in enumerate(per_rank[0])]


def _markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"# Custom all-reduce kernels, {meta['algorithm']}: {meta['head']} against {meta['base']}", "",
             f"{meta['gpus']} x {meta['gpu']}, {meta['date']}. Base: kernels/ at {meta['base']}; head: "
             f"{meta['head']}. Command: `{meta['command']}`.", "",
             "Per-call time, the slowest rank's median over alternating rounds (a graph replay of 50 "
             "all-reduces, or 200 eager calls, per variant per round); ratios: the median over rounds, "
             "per rank (lowest–highest).", ""]
    for world, rows in record["worlds"].items():
        lines += [f"## {world} ranks, placement {meta['placements'][world]}", "",
                  "| bytes | mode | base µs | head µs | base w/o fail-stop µs | head w/o fail-stop µs "
                  "| head / base | fail-stop / without, base | fail-stop / without, head | wrong |",
                  "|---:|---|---:|---:|---:|---:|---|---|---|---:|"]
        for r in rows:
            us, ratios = r["slowest_rank_us"], r["ratios_per_rank"]

            def span(key):
                return f"{min(ratios[key]):.3f}–{max(ratios[key]):.3f}"

            lines.append(f"| {r['bytes']} | {r['mode']} | {us['base']:.2f} | {us['head']:.2f} "
                         f"| {us['base without fail-stop']:.2f} | {us['head without fail-stop']:.2f} "
                         f"| {span('head / base')} | {span('fail-stop / without, base')} "
                         f"| {span('fail-stop / without, head')} | {r['wrong']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench kernel-ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose kernels/ are the baseline")
    parser.add_argument("--algorithm", default="lamport_one_shot",
                        choices=["lamport_one_shot", "one_shot", "two_shot"])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 10, 8 << 10, 32 << 10],
                        help="bytes (bfloat16); Lamport takes up to 32 KiB at 8 ranks")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--head", default=None, help="what to call the working tree's kernels "
                                                     "(default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="distrib-bench-kernel-ab-")
    record = {"meta": {"algorithm": args.algorithm, "gpu": _gpu_name(), "gpus": visible_gpus(),
                       "head": args.head or _commit(), "date": datetime.now(timezone.utc).isoformat(),
                       "command": "python -m distrib.bench kernel-ab " + " ".join(argv or []),
                       "placements": {}},
              "worlds": {}}
    with tempfile.TemporaryDirectory() as base_dir:
        record["meta"]["base"] = _export(args.base, Path(base_dir))
        for world in args.nprocs:
            per_rank = distrib.launch(_worker, nprocs=world, args=(base_dir, args.algorithm, args.sizes,
                                                                   args.rounds, 50, 200),
                                      timeout=900, start_method="forkserver", **placement(world))
            record["meta"]["placements"][world] = placement(world)
            record["worlds"][world] = _summary(per_rank)
            # After each world size, so that a later one that fails leaves the earlier ones.
            _report.save(record, _markdown(record), Path(args.out), f"kernel-ab-{args.algorithm}")
    return 0
