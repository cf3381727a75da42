"""``python -m distrib.bench groups``: what groups cost the custom all-reduce, and send/recv latency.

Two parts (``--parts``):

- ``allreduce`` (GPUs): the custom all-reduce of a group against the same
  all-reduce on the whole launch, CUDA-graph replays and eager calls, bf16:
  - *same ranks*: in one launch of ``--nprocs`` ranks, a communicator on the
    launch and one on a group of every rank, timed in alternating rounds in
    the same processes (``_alternate.time_in_turns``); the ratio group / launch
    is the median over rounds, per rank;
  - *a group of a larger launch*: a launch of twice as many ranks, as TP
    groups of ``--nprocs`` (``distrib.parallel.layout``), group 0 timed while
    group 1 waits; its medians beside the first launch's (different launches,
    so no paired ratio).
- ``sendrecv``: one-way latency of ``send``/``recv`` between ranks 0 and 1
  for each ``--sizes``: a ping-pong of ``--iters`` round trips, one way =
  half a round trip, the median of ``--repeats`` samples. gloo on CPU
  tensors always; on GPUs, CUDA IPC eager and in a graph (ranks on one GPU
  or two), and NCCL where two GPUs are free for it.

Every result is checked exactly. Writes ``groups-<part>.json`` and ``.md`` to
``--out`` and prints the tables. On ranks sharing one GPU the times are the
ratio's business only: the kernels of every rank share the GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

from . import _report

AR_SIZES = (1 << 10, 32 << 10, 256 << 10, 1 << 20)
P2P_SIZES = (16 << 10, 1 << 20)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench groups", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="allreduce,sendrecv", help="allreduce, sendrecv (default both)")
    parser.add_argument("--nprocs", type=int, default=2, help="ranks of a group (default 2)")
    parser.add_argument("--rounds", type=int, default=50, help="alternating rounds per size (default 50)")
    parser.add_argument("--ops", type=int, default=50, help="all-reduces per captured graph (default 50)")
    parser.add_argument("--eager-calls", type=int, default=100, help="eager calls per round (default 100)")
    parser.add_argument("--sizes", default=",".join(str(s) for s in P2P_SIZES),
                        help="send/recv sizes in bytes (default 16 KiB, 1 MiB)")
    parser.add_argument("--iters", type=int, default=100, help="round trips per send/recv sample (default 100)")
    parser.add_argument("--repeats", type=int, default=15, help="send/recv samples (default 15)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    return parser


# -- all-reduce: in each rank ------------------------------------------------------------------

def _custom(coordinator, device):
    from ..communicator.custom import CustomAllReduceCommunicator

    return CustomAllReduceCommunicator(coordinator, device, max_bytes=max(AR_SIZES))


def same_ranks_rank(rounds: int, ops: int, eager_calls: int) -> list:
    """The launch's communicator and a group-of-everyone's, timed in turns (per size and mode)."""
    import torch

    import distrib

    from ._alternate import median_round_ratio, time_in_turns

    ctx = distrib.init()
    world = ctx.coordinator
    group = world.group(list(range(world.world_size)), name="everyone")
    comms = {"launch": _custom(world, ctx.device), "group": _custom(group, ctx.device)}
    rows = []
    for nbytes in AR_SIZES:
        x = torch.full((nbytes // 2,), float(world.rank + 1), dtype=torch.bfloat16, device="cuda")
        outs = [torch.empty_like(x) for _ in range(ops)]
        expect = float(world.world_size * (world.world_size + 1) // 2)
        times, wrong = time_in_turns(ctx, comms, x, outs, rounds, eager_calls, expect=expect)
        for mode in ("graph", "eager"):
            rows.append({"bytes": nbytes, "mode": mode, "wrong": wrong[mode],
                         "median_us": {k: statistics.median(times[(mode, k)]) for k in comms},
                         "group / launch": median_round_ratio(times[(mode, "group")], times[(mode, "launch")])})
    for comm in comms.values():
        comm.check()
        comm.close()
    return rows


def larger_launch_rank(tp: int, rounds: int, ops: int, eager_calls: int) -> Optional[list]:
    """TP group 0 of a launch of ``2 * tp`` ranks, timed while group 1 waits in a barrier."""
    import torch

    import distrib

    from ._alternate import time_in_turns

    ctx = distrib.init()
    layout = distrib.parallel.layout(tp=tp)
    rows = None
    if layout.dp_rank == 0:
        comm = _custom(layout.tp, ctx.device)
        rows = []
        for nbytes in AR_SIZES:
            x = torch.full((nbytes // 2,), float(layout.tp.rank + 1), dtype=torch.bfloat16, device="cuda")
            outs = [torch.empty_like(x) for _ in range(ops)]
            expect = float(tp * (tp + 1) // 2)
            times, wrong = time_in_turns(SimpleNamespace(coordinator=layout.tp), {"group": comm}, x, outs,
                                         rounds, eager_calls, expect=expect)
            for mode in ("graph", "eager"):
                rows.append({"bytes": nbytes, "mode": mode, "wrong": wrong[mode],
                             "median_us": {"group": statistics.median(times[(mode, "group")])}})
        comm.check()
        comm.close()
    ctx.coordinator.barrier(timeout=1800)
    layout.close()
    return rows


# -- send/recv: in each rank -------------------------------------------------------------------

def sendrecv_rank(sizes: list, iters: int, repeats: int) -> dict:
    """Ping-pong latency between ranks 0 and 1 per backend and size (rank 0 reports)."""
    import torch

    import distrib
    from ..communicator import communicators

    ctx = distrib.init()
    rank = ctx.coordinator.rank
    backends = {"gloo": (communicators.get("gloo")(ctx.coordinator), torch.device("cpu"))}
    if ctx.device is not None:  # a GPU: CUDA IPC, and NCCL where it runs
        torch.cuda.set_device(ctx.device)
        device = torch.device("cuda", ctx.device)
        backends["ipc"] = (communicators.get("ipc")(ctx.coordinator, ctx.device), device)
        nccl = communicators.get("nccl")
        if nccl.unavailable_reason(ctx.coordinator, ctx.device) is None:
            backends["nccl"] = (nccl(ctx.coordinator, ctx.device), device)
    results = {}
    for name, (comm, device) in backends.items():
        for nbytes in sizes:
            x = torch.full((nbytes // 4,), float(rank + 1), device=device)
            y = torch.zeros_like(x)
            modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
            for mode in modes:
                samples, wrong = _ping_pong(ctx, comm, x, y, iters, repeats, mode)
                results[f"{name}/{mode}/{nbytes}"] = {"backend": name, "mode": mode, "bytes": nbytes,
                                                      "one_way_us": samples, "wrong": wrong}
    for comm, _ in backends.values():
        comm.close()
    return results if rank == 0 else {}


def _ping_pong(ctx, comm, x, y, iters: int, repeats: int, mode: str) -> tuple[list, int]:
    import torch

    rank = ctx.coordinator.rank
    peer = 1 - rank
    gpu = x.device.type == "cuda"

    def trips(n):
        for _ in range(n):
            if rank == 0:
                comm.send(x, 1)
                comm.recv(y, 1)
            else:
                comm.recv(y, 0)
                comm.send(x, 0)

    run = lambda: trips(iters)  # noqa: E731
    if mode == "graph":
        trips(2)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            trips(iters)
        run = graph.replay
    samples, wrong = [], 0
    for _ in range(repeats + 1):  # the first is a warm-up
        y.zero_()
        if gpu:
            torch.cuda.synchronize()
        ctx.coordinator.barrier()
        start = time.perf_counter()
        run()
        if gpu:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / iters / 2 * 1e6)
        wrong += int((y != float(peer + 1)).sum().item())
    return samples[1:], wrong


# -- the launcher's side -------------------------------------------------------------------------

def _allreduce(args, meta: dict, placement) -> dict:
    from ..launcher import launch

    n = args.nprocs
    same = launch(same_ranks_rank, n, args=(args.rounds, args.ops, args.eager_calls), start_method="spawn",
                  timeout=3600, **placement(n))
    larger = launch(larger_launch_rank, 2 * n, args=(n, args.rounds, args.ops, args.eager_calls),
                    start_method="spawn", timeout=3600, **placement(2 * n))
    rows = []
    for i, first in enumerate(same[0]):
        per_rank = [r[i] for r in same]
        group_rows = [r[i] for r in larger if r is not None]
        rows.append({"bytes": first["bytes"], "mode": first["mode"],
                     "wrong": sum(r["wrong"] for r in per_rank + group_rows),
                     "launch_us": max(r["median_us"]["launch"] for r in per_rank),
                     "group_us": max(r["median_us"]["group"] for r in per_rank),
                     "group_over_launch_per_rank": [r["group / launch"] for r in per_rank],
                     "group_of_larger_launch_us": max(r["median_us"]["group"] for r in group_rows)})
    return {"meta": {**meta, "nprocs": n, "placement": placement(n), "larger_placement": placement(2 * n),
                     "rounds": args.rounds, "ops": args.ops, "eager_calls": args.eager_calls}, "rows": rows}


def _allreduce_table(record: dict) -> str:
    meta = record["meta"]
    lines = [f"# Custom all-reduce: a group against the whole launch ({meta['nprocs']} ranks)", "",
             f"{meta['device_name']}, {meta['date']}, commit `{meta['commit']}`. Command: `{meta['command']}`.", "",
             f"Ranks: {meta['placement']}. bf16, the slowest rank's median µs per all-reduce over "
             f"{meta['rounds']} alternating rounds (a graph replay of {meta['ops']} all-reduces, or "
             f"{meta['eager_calls']} eager calls, per round); group / launch: per rank, the median over rounds "
             "of the ratio in each round. The last column is a TP group of the same size in a launch of twice "
             "as many ranks (the other group waiting), a separate launch.", "",
             "| bytes | mode | launch µs | group µs | group / launch (per rank) | group of a 2x launch µs | wrong |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for r in record["rows"]:
        ratios = ", ".join(f"{x:.3f}" for x in r["group_over_launch_per_rank"])
        lines.append(f"| {_report.size_text(r['bytes'])} | {r['mode']} | {r['launch_us']:.2f} | {r['group_us']:.2f} "
                     f"| {ratios} | {r['group_of_larger_launch_us']:.2f} | {r['wrong']} |")
    return "\n".join(lines) + "\n"


def _sendrecv(args, meta: dict, placement, gpus: int) -> dict:
    from ..launcher import launch

    sizes = [int(s) for s in args.sizes.split(",")]
    where = placement(2) if gpus else {"devices": "cpu"}
    results = launch(sendrecv_rank, 2, args=(sizes, args.iters, args.repeats), start_method="spawn",
                     timeout=3600, **where)[0]
    rows = []
    for key, r in results.items():
        samples = r["one_way_us"]
        rows.append({**{k: r[k] for k in ("backend", "mode", "bytes", "wrong")},
                     "median_us": statistics.median(samples), "min_us": min(samples), "max_us": max(samples)})
    gloo = {r["bytes"]: r["median_us"] for r in rows if r["backend"] == "gloo"}
    for r in rows:
        r["over_gloo"] = r["median_us"] / gloo[r["bytes"]] if gloo.get(r["bytes"]) else None
    return {"meta": {**meta, "placement": where, "iters": args.iters, "repeats": args.repeats}, "rows": rows}


def _sendrecv_table(record: dict) -> str:
    meta = record["meta"]
    lines = ["# send/recv: one-way latency between two ranks", "",
             f"{meta['device_name']}, {meta['date']}, commit `{meta['commit']}`. Command: `{meta['command']}`.", "",
             f"Ranks: {meta['placement']}. A ping-pong of {meta['iters']} round trips of float32 tensors, one way "
             f"= half a round trip (wall clock, the GPU synchronised after the loop); the median, min and max of "
             f"{meta['repeats']} samples. gloo moves CPU tensors; ipc and nccl GPU tensors, eager or as one "
             "replayed CUDA graph of all the round trips.", "",
             "| backend | mode | bytes | median µs | min | max | × gloo | wrong |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(record["rows"], key=lambda r: (r["bytes"], r["backend"], r["mode"])):
        over = f"{r['over_gloo']:.3f}" if r["over_gloo"] else "—"
        lines.append(f"| {r['backend']} | {r['mode']} | {_report.size_text(r['bytes'])} | {r['median_us']:.2f} | "
                     f"{r['min_us']:.2f} | {r['max_us']:.2f} | {over} | {r['wrong']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..launcher._devices import visible_gpu_count
    from ..testing.placement import placement
    from .allreduce import git_commit

    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"allreduce", "sendrecv"}
    if unknown or args.nprocs < 2 or args.rounds < 1 or args.iters < 1 or args.repeats < 1:
        raise SystemExit("need --parts from allreduce,sendrecv, --nprocs >= 2, and positive counts")
    gpus = visible_gpu_count()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit or git_commit(), "host": platform.node(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "device_name": _gpu_name() if gpus else f"CPU ({len(os.sched_getaffinity(0))} cores)",
            "gpus": gpus, "command": "python -m distrib.bench groups " + " ".join(argv or sys.argv[1:])}
    out = args.out or Path(tempfile.mkdtemp(prefix="distrib-bench-groups-"))
    wrong = 0
    if "allreduce" in parts:
        if not gpus:
            print("groups: the allreduce part needs a GPU; skipped", file=sys.stderr)
        else:
            record = _allreduce(args, meta, placement)
            _report.save(record, _allreduce_table(record), out, f"groups-allreduce-{args.nprocs}ranks")
            wrong += sum(r["wrong"] for r in record["rows"])
    if "sendrecv" in parts:
        record = _sendrecv(args, meta, placement, gpus)
        _report.save(record, _sendrecv_table(record), out, "groups-sendrecv")
        wrong += sum(r["wrong"] for r in record["rows"])
    if wrong:
        print(f"groups: {wrong} wrong results", file=sys.stderr)
        return 1
    return 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
