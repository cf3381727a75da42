"""The custom all-reduce's fail-stop, measured: scenarios repeated, the abort path timed, the cost.

    python -m distrib.bench failstop --nprocs 2 4 8 --reps 20 --out benchmarks/results/1xH200

Ranks get a GPU each where there are enough, else share the GPUs (as the GPU
tests do). Per world size:

- ``scenarios``: a peer that stalls past the timeout, eager and graph, every
  algorithm, ``--reps`` times each in one launch (``on_error="raise"``, so
  every outcome is seen); a peer stalled between two barriers of one kernel
  (one- and two-shot), while its peers give up at the last barrier and
  overwrite what it has yet to read; counters across their wrap, calls on two
  streams, a replay before registration and mismatched limits. The figure
  that matters: wrong sums, which must be 0.
- ``abort``: ``--abort-reps`` launches in which a peer stalls and the default
  ``on_error="abort"`` ends the launch; the time from the kernel's timeout to
  ``distrib.launch`` raising (every rank gone), and whether the error names
  the late rank. Also a peer that SIGKILLs itself mid-call.
- ``cost``: eager (a Python call per all-reduce, back to back) and CUDA-graph
  replay time per all-reduce, with fail-stop and with it compiled out
  (``fail_stop=False``), measured alternately in the same processes.

Writes failstop-<N>ranks.json and a markdown table. Parts not run this time are kept
from the file already there (same world size and GPU), each with its own commit and date,
so the parts can be run in separate calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import distrib

from ..testing import failstop
from ..testing.placement import placement, visible_gpus
from . import _report
from ._alternate import median_round_ratio, time_in_turns

SIZES = {"lamport_one_shot": 1 << 10, "one_shot": 256 << 10, "two_shot": 1 << 20}


def _launch(fn, nprocs, *args, timeout=900, **kwargs):
    return distrib.launch(fn, nprocs=nprocs, args=args, kwargs=kwargs, timeout=timeout,
                          start_method="forkserver", **placement(nprocs))


# -- scenarios, in one launch -------------------------------------------------------------

def _scenarios_worker(reps: int) -> dict:
    ctx = distrib.init()
    world = ctx.info.world_size
    out: dict[str, Any] = {
        "late_peer": failstop.late_peer_rounds(reps, world - 1, timeout=0.2, stall=0.6, calls=7)}
    out["stall_mid_call"] = {alg: [failstop.stalls_mid_call(alg, world - 1) for _ in range(reps)]
                             for alg in ("one_shot", "two_shot")}
    out["wrap"] = [failstop.counters_across_the_wrap(3000)[0] for _ in range(reps)]
    out["two_streams"] = [failstop.two_streams(2000) for _ in range(reps)]
    out["replay_before_registration"] = [failstop.replay_before_registration() for _ in range(reps)]
    out["mismatched_limits"] = [failstop.mismatched_limits() for _ in range(reps)]
    return out


def _tally(per_rank: list[dict], world: int) -> dict:
    rows = {}
    for name in per_rank[0]["late_peer"]:
        counts: dict = {}
        named = 0
        for rank, scenarios in enumerate(per_rank):
            for outcomes in scenarios["late_peer"][name]:
                for o in outcomes:
                    key = "check" if o.startswith("check: ") else o
                    counts[key] = counts.get(key, 0) + 1
                    named += o.startswith("check: ") and f"waiting for rank {world - 1}" in o
        rows[f"late peer, {name}"] = {"runs": len(per_rank[0]["late_peer"][name]), "outcomes": counts,
                                      "wrong": counts.get("wrong", 0),
                                      "errors naming the late rank": named}
    for alg in per_rank[0]["stall_mid_call"]:
        runs = [outcomes for r in per_rank for outcomes in r["stall_mid_call"][alg]]
        counts = {}
        for outcomes in runs:
            for o in outcomes:
                counts[o] = counts.get(o, 0) + 1
        stalled = [outcomes[3] for outcomes in per_rank[-1]["stall_mid_call"][alg]]
        rows[f"peer stalled between barriers, eager/{alg}"] = {
            "runs": len(per_rank[0]["stall_mid_call"][alg]), "outcomes": counts,
            "wrong": counts.get("wrong", 0), "stalled call NaN": stalled.count("nan")}
    rows["counters across the wrap (3000 calls)"] = {
        "runs": len(per_rank[0]["wrap"]), "wrong": sum(sum(r["wrap"]) for r in per_rank)}
    rows["two streams (2000 calls)"] = {
        "runs": len(per_rank[0]["two_streams"]), "wrong": sum(sum(r["two_streams"]) for r in per_rank)}
    refused = [rep for r in per_rank for rep in r["replay_before_registration"]]
    rows["replay before registration"] = {
        "runs": len(per_rank[0]["replay_before_registration"]),
        "wrong": sum(rep["early"] != "nan" or rep["after_failed_registration"] != "nan" for rep in refused),
        "refused and named": sum(bool(rep["early_check"]) and bool(rep["register"]) for rep in refused)}
    messages = [m for r in per_rank for m in r["mismatched_limits"]]
    rows["mismatched limits"] = {"runs": len(per_rank[0]["mismatched_limits"]),
                                 "refused on every rank": sum(bool(m) and "max_bytes" in m for m in messages),
                                 "wrong": 0}
    return rows


# -- the abort path, one launch per repetition ------------------------------------------------

def _abort_once(world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        error = None
        try:
            _launch(failstop.late_peer, world, "graph", "one_shot", world - 1, stall=60.0, calls=8,
                    log=log, on_error="abort", timeout=300)
        except distrib.WorkerFailedError as exc:
            error = exc
        ended = time.time()
        records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    stall = next((t for _, _, what, t in records if what == "stall"), None)
    return {"raised": error is not None,
            "named": error is not None and f"waiting for rank {world - 1}" in str(error),
            "seconds_from_timeout_to_exit": None if stall is None else ended - (stall + 0.3),
            "wrong": sum(what == "wrong" for _, _, what, _ in records)}


def _dies_once(world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        error = None
        try:
            _launch(failstop.dies_mid_call, world, world - 1, log, timeout=300)
        except distrib.WorkerFailedError as exc:
            error = exc
        records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return {"named": error is not None and f"rank {world - 1}" in str(error) and "SIGKILL" in str(error),
            "wrong": sum(what == "wrong" for _, _, what, _ in records)}


# -- cost ------------------------------------------------------------------------------------

def _median(values):
    return statistics.median(values)


def _cost_worker(rounds: int, ops: int, eager_calls: int) -> list[dict]:
    import torch

    from distrib.communicator.custom import CustomAllReduceCommunicator

    ctx = distrib.init()
    rank = ctx.info.rank
    comms = {(alg, fs): CustomAllReduceCommunicator(ctx.coordinator, ctx.device, algorithm=alg,
                                                    max_bytes=max(SIZES.values()), fail_stop=fs)
             for alg in SIZES for fs in (True, False)}
    rows = []
    for alg, nbytes in SIZES.items():
        x = torch.full((nbytes // 2,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        outs = [torch.empty_like(x) for _ in range(ops)]
        times, _ = time_in_turns(ctx, {fs: comms[(alg, fs)] for fs in (True, False)}, x, outs, rounds,
                                 eager_calls)
        for mode in ("graph", "eager"):
            on, off = times[(mode, True)], times[(mode, False)]
            rows.append({"algorithm": alg, "bytes": nbytes, "mode": mode, "rounds": rounds,
                         "fail_stop_us": _median(on), "without_us": _median(off),
                         "median_round_ratio": median_round_ratio(on, off)})
    for comm in comms.values():
        comm.check()
        comm.close()
    return rows


# -- the run ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench failstop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each in-launch scenario")
    parser.add_argument("--abort-reps", type=int, nargs="+", default=[20],
                        help="launches that end by abort, per world size (one number for all, or one each)")
    parser.add_argument("--parts", nargs="+", default=["scenarios", "abort", "cost"],
                        choices=["scenarios", "abort", "cost"])
    parser.add_argument("--rounds", type=int, default=100, help="cost: alternating measurement rounds")
    parser.add_argument("--out", default=None,
                        help="output directory (default: a temporary one, printed); parts run in separate "
                             "calls merge into the record there, so give them the same --out")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="distrib-bench-failstop-")
        print(f"failstop: the records go to {args.out}", file=sys.stderr)
    gpu = _gpu_name()
    for index, world in enumerate(args.nprocs):
        path = os.path.join(args.out, f"failstop-{world}ranks.json")
        record = _kept(path, world, gpu)
        record["meta"].update({"world_size": world, "gpus": visible_gpus(), "gpu": gpu,
                               "placement": placement(world)})

        def ran(part, **extra):
            record["meta"]["parts"][part] = {"commit": args.commit or _commit(),
                                             "date": datetime.now(timezone.utc).isoformat(), **extra}

        if "scenarios" in args.parts:
            record["scenarios"] = _tally(_launch(_scenarios_worker, world, args.reps), world)
            ran("scenarios", reps=args.reps)
        if "abort" in args.parts:
            reps = args.abort_reps[min(index, len(args.abort_reps) - 1)]
            aborts, deaths = [], []
            for i in range(reps):
                aborts.append(_abort_once(world))
                deaths.append(_dies_once(world))
                print(f"{world} ranks, abort {i + 1}/{reps}: {aborts[-1]}; SIGKILL: {deaths[-1]}", flush=True)
            seconds = [a["seconds_from_timeout_to_exit"] for a in aborts
                       if a["seconds_from_timeout_to_exit"] is not None]
            record["abort"] = {
                "late peer, on_error=abort": {
                    "runs": reps, "launch raised": sum(a["raised"] for a in aborts),
                    "named the late rank": sum(a["named"] for a in aborts),
                    "wrong": sum(a["wrong"] for a in aborts),
                    "median_s_from_timeout_to_exit": _median(seconds) if seconds else None,
                    "max_s_from_timeout_to_exit": max(seconds) if seconds else None},
                "peer SIGKILLed mid-call": {
                    "runs": reps, "named": sum(d["named"] for d in deaths),
                    "wrong": sum(d["wrong"] for d in deaths)}}
            ran("abort", reps=reps)
        if "cost" in args.parts:
            rows = _launch(_cost_worker, world, args.rounds, 50, 200)
            record["cost"] = [dict(r, slowest_rank_fail_stop_us=max(p[i]["fail_stop_us"] for p in rows),
                                   slowest_rank_without_us=max(p[i]["without_us"] for p in rows),
                                   median_round_ratio_per_rank=[p[i]["median_round_ratio"] for p in rows])
                              for i, r in enumerate(rows[0])]
            ran("cost", rounds=args.rounds)
        _report.save(record, _markdown(record), Path(args.out), f"failstop-{world}ranks")
    return 0


def _kept(path: str, world: int, gpu: str) -> dict:
    """What an earlier run left at ``path`` for this world size and GPU, so that parts run
    separately (each in its own call) end up in one record; each part keeps its own provenance."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    meta = record.get("meta", {})
    if meta.get("world_size") != world or meta.get("gpu") != gpu or "parts" not in meta:
        record = {}
    return record or {"meta": {"parts": {}}}


def _markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"# Custom all-reduce fail-stop, {meta['world_size']} ranks on {meta['gpus']} x {meta['gpu']}",
             "", f"Placement {meta['placement']}."]
    for part, run in meta["parts"].items():
        extra = ", ".join(f"{k} {v}" for k, v in run.items() if k not in ("commit", "date"))
        lines.append(f"- {part}: commit {run['commit']}, {run['date']}" + (f", {extra}" if extra else ""))
    lines.append("")
    if "scenarios" in record:
        lines += ["| scenario | runs | wrong sums | outcomes / checks |", "|---|---:|---:|---|"]
        for name, row in record["scenarios"].items():
            rest = {k: v for k, v in row.items() if k not in ("runs", "wrong")}
            lines.append(f"| {name} | {row['runs']} | {row['wrong']} | {json.dumps(rest)} |")
        lines.append("")
    if "abort" in record:
        lines += ["| abort path | runs | result |", "|---|---:|---|"]
        for name, row in record["abort"].items():
            rest = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "runs"}
            lines.append(f"| {name} | {row['runs']} | {json.dumps(rest)} |")
        lines.append("")
    if "cost" in record:
        lines += ["Per-call time, the slowest rank's median over alternating rounds (a graph replay of 50 "
                  "all-reduces, or 200 eager calls, each way per round); last column: the median over "
                  "rounds of fail-stop / without, per rank.", "",
                  "| algorithm | bytes | mode | fail-stop µs | without µs | ratio | round ratios per rank |",
                  "|---|---:|---|---:|---:|---:|---|"]
        for r in record["cost"]:
            a, b = r["slowest_rank_fail_stop_us"], r["slowest_rank_without_us"]
            rounds = ", ".join(f"{x:.3f}" for x in r.get("median_round_ratio_per_rank", []))
            lines.append(f"| {r['algorithm']} | {r['bytes']} | {r['mode']} | {a:.2f} | {b:.2f} | {a / b:.3f} "
                         f"| {rounds} |")
        lines.append("")
    return "\n".join(lines)


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        return "no GPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
