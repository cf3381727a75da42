"""Measure every algorithm of the custom all-reduce against NCCL, to set its tables.

    python -m distrib.bench custom-crossover --nprocs 2 --out benchmarks/results

One process per GPU (``distrib.launch``). For each dtype and size: CUDA-graph
replay time per all-reduce of each custom algorithm (staged: the kernel copies
the input into its buffer; registered: it reads the captured tensor; Lamport:
pushes), eager time per call through the communicator (Python included), and
NCCL through CuPy measured the same way in the same run. Medians of several
replays, each of ``--ops`` captured all-reduces, timed with CUDA events.
Results are checked for every size. Writes JSON and a markdown table.
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

import distrib

KB = 1 << 10
ALGORITHMS = ("lamport_one_shot", "one_shot", "two_shot")


def _median_us(fn, reps: int, per_rep: int) -> float:
    import torch

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_rep)
    return statistics.median(times)


def _worker(sizes, dtypes, ops, reps, lamport_cap, max_blocks):
    import torch

    from distrib.communicator import create

    ctx = distrib.init()
    coord, rank, world = ctx.coordinator, ctx.info.rank, ctx.info.world_size
    comms = {alg: create(coord, ctx.device, order=["custom"],
                         options={"custom": {"algorithm": alg, "max_bytes": max(sizes),
                                                    "max_blocks": max_blocks}})
             for alg in ALGORITHMS}
    nccl = create(coord, ctx.device, order=["nccl"])
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for nbytes in sizes:
            n = nbytes // dtype.itemsize
            row = {"dtype": dtype_name, "bytes": nbytes}
            variants = [(f"{alg}:{mode}", comms[alg], mode) for alg in ALGORITHMS
                        for mode in (("staged", "registered") if alg != "lamport_one_shot" else ("staged",))
                        if alg != "lamport_one_shot" or nbytes <= lamport_cap]
            variants.append(("nccl", nccl, "staged"))
            for label, comm, mode in variants:
                ins = [torch.full((n,), float(rank + 1), dtype=dtype, device="cuda") for _ in range(2)]
                outs = [torch.empty_like(ins[0]) for _ in range(2)]
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                coord.barrier()
                capture = comm.capture() if mode == "registered" else _nothing()
                with capture:
                    for i in range(2):  # warm-up inside capture(): must stay eager
                        comm.all_reduce(ins[i], out=outs[i])
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph):
                        for k in range(ops):
                            comm.all_reduce(ins[k % 2], out=outs[k % 2])
                torch.cuda.synchronize()
                coord.barrier()
                graph.replay()
                torch.cuda.synchronize()
                expected = float(world * (world + 1) // 2)
                ok = all(bool(torch.all(o == expected)) for o in outs)
                coord.barrier()
                row[f"graph:{label}"] = _median_us(graph.replay, reps, ops)
                row[f"ok:{label}"] = ok
                del graph
                if mode == "staged":
                    x = ins[0]
                    for _ in range(5):
                        comm.all_reduce(x, out=outs[0])
                    torch.cuda.synchronize()
                    coord.barrier()
                    row[f"eager:{label}"] = _median_us(
                        lambda: [comm.all_reduce(x, out=outs[0]) for _ in range(ops)], reps, ops)
            rows.append(row)
    for c in list(comms.values()) + [nccl]:
        c.close()
    return rows


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench custom-crossover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--min-bytes", type=int, default=1 * KB)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--ops", type=int, default=20, help="all-reduces per captured graph")
    parser.add_argument("--reps", type=int, default=15, help="replays timed per size")
    parser.add_argument("--lamport-cap", type=int, default=1 << 20)
    parser.add_argument("--max-blocks", type=int, default=None, help="thread blocks (default: the table's)")
    args = parser.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="distrib-bench-custom-crossover-")
    sizes, s = [], args.min_bytes
    while s <= args.max_bytes:
        sizes.append(s)
        s *= 2
    start = time.time()
    results = distrib.launch(_worker, nprocs=args.nprocs,
                             args=(sizes, args.dtypes.split(","), args.ops, args.reps, args.lamport_cap,
                                   args.max_blocks),
                             timeout=1800)
    rows = results[0]
    import torch

    meta = {"benchmark": "custom-crossover", "world_size": args.nprocs,
            "device": torch.cuda.get_device_name(0), "date": datetime.now(timezone.utc).isoformat(),
            "commit": _commit(), "ops_per_graph": args.ops, "replays": args.reps,
            "max_blocks": args.max_blocks, "seconds": round(time.time() - start, 1)}
    os.makedirs(args.out, exist_ok=True)
    tag = f"custom-crossover-{args.nprocs}x{meta['device'].split()[-1]}"
    if args.max_blocks:
        tag += f"-blocks{args.max_blocks}"
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(_table(meta, rows))
    print(_table(meta, rows))
    print(f"wrote {os.path.join(args.out, tag)}.json, .md", file=sys.stderr)
    return 0


def _table(meta, rows) -> str:
    labels = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("graph:")},
                    key=lambda l: (l == "nccl", l))
    out = [f"# custom all-reduce crossover: {meta['world_size']}x {meta['device']}",
           f"{meta['date']} · commit {meta['commit']} · CUDA-graph replay, µs per all-reduce "
           f"(median of {meta['replays']} replays of {meta['ops_per_graph']}); eager: µs per call "
           "through the communicator, Python included", ""]
    head = ["dtype", "bytes"] + [f"graph {l}" for l in labels] + ["eager custom best", "eager nccl", "fastest (graph)"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        graph = {l: r.get(f"graph:{l}") for l in labels}
        best = min((v, l) for l, v in graph.items() if v is not None)
        eager_custom = min(v for k, v in r.items() if k.startswith("eager:") and "nccl" not in k)
        cells = [r["dtype"], _size(r["bytes"])] + [f"{graph[l]:.2f}" if graph[l] is not None else "" for l in labels]
        cells += [f"{eager_custom:.2f}", f"{r.get('eager:nccl', float('nan')):.2f}", best[1]]
        bad = [k for k, v in r.items() if k.startswith("ok:") and not v]
        if bad:
            cells[-1] += " WRONG RESULT: " + ", ".join(bad)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
