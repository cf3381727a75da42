"""``python -m distrib.bench allreduce``: the latency of one all-reduce, ours against the peers.

Runs under our own launcher (``distrib.launch``), one process per GPU, and
measures in the same run every registered communicator that can start, our
dispatcher, and the peers: ``torch.distributed`` NCCL on its default group,
and PyTorch symmetric memory's one-shot and two-shot all-reduce. Modes: eager
(one Python call per all-reduce) and CUDA graph (many captured, replayed).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

Writes ``allreduce.json``, ``allreduce.md`` and ``allreduce.png`` to ``--out``.
``--smoke`` runs the same machinery on CPU ranks with gloo and tiny sizes, so
that CI keeps it working. Exit status 1 if any of our communicators gave a wrong
result or failed on a size; a peer's failure is reported, not fatal.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from . import _report

KIB, MIB = 1 << 10, 1 << 20
DEFAULT_SIZES = tuple(KIB * 4 ** k for k in range(10))  # 1 KiB … 256 MiB; DESIGN.md's sizes are among them
QUICK_SIZES = (KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB)
SMOKE_SIZES = (KIB, 4 * KIB, 64 * KIB)
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}


def parse_size(text: str) -> int:
    """'64K', '1M', '1MiB', '4096' -> bytes (powers of 1024)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": KIB, "M": MIB, "G": 1 << 30}.get(value[-1:], 1)
    number = value[:-1] if scale > 1 else value
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a positive byte count like 4096, 64K or 1M")
    return int(number) * scale


def _list(parse):
    def parse_list(text: str):
        return tuple(parse(item) for item in text.split(",") if item.strip())
    return parse_list


def _dtype(text: str) -> str:
    try:
        return DTYPE_NAMES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype {text!r}: expected bf16, fp32 or fp16") from None


def _mode(text: str) -> str:
    if text.strip() not in ("eager", "graph"):
        raise argparse.ArgumentTypeError(f"mode {text!r}: expected eager or graph")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distrib.bench allreduce", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=None,
                        help="ranks, one per GPU (default: every visible GPU; 2 with --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: a temporary one, printed; the results committed "
                             "with distrib live in benchmarks/results/<N>x<GPU>)")
    parser.add_argument("--sizes", type=_list(parse_size), default=None,
                        help="message sizes in bytes, e.g. 1K,64K,1M (default: 1 KiB to 256 MiB, powers of 4)")
    parser.add_argument("--dtypes", type=_list(_dtype), default=("bfloat16", "float32"), help="default bf16,fp32")
    parser.add_argument("--modes", type=_list(_mode), default=None, help="eager,graph (default both; eager on CPU)")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per case (fewer for large sizes)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--graph-ops", type=int, default=16, help="all-reduces captured per CUDA graph")
    parser.add_argument("--targets", type=_list(str), default=None,
                        help="only these, e.g. distrib:nccl,torch:nccl (default: every one that can start)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {', '.join(map(_report.size_text, QUICK_SIZES))}; 20 iterations")
    parser.add_argument("--smoke", action="store_true", help="CPU ranks with gloo, tiny sizes, eager only (for CI)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole launch")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    return parser


def config_from(args: argparse.Namespace) -> dict:
    modes: Sequence[str]
    if args.smoke:
        device, nprocs = "cpu", args.nprocs or 2
        sizes, modes, iters = args.sizes or SMOKE_SIZES, ("eager",), min(args.iters, 10)
    else:
        from ..launcher._devices import visible_gpu_count

        device, nprocs = "cuda", args.nprocs or visible_gpu_count()
        if nprocs < 1:
            raise SystemExit("no GPU is visible; use --smoke for the CPU run")
        sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
        modes = args.modes or ("eager", "graph")
        iters = min(args.iters, 20) if args.quick else args.iters
    if device == "cpu" and "graph" in (args.modes or ()):
        raise SystemExit("CUDA-graph mode needs GPUs")
    for name, value in (("--iters", iters), ("--graph-ops", args.graph_ops), ("--nprocs", nprocs)):
        if value < 1:
            raise SystemExit(f"{name} must be at least 1")
    return {"device": device, "nprocs": nprocs, "sizes": sorted(set(sizes)), "dtypes": list(args.dtypes),
            "modes": list(modes), "iters": iters, "warmup": max(0, args.warmup),
            "graph_ops": args.graph_ops, "targets": list(args.targets) if args.targets else None}


def run(config: dict, timeout: float) -> list[dict]:
    """Launch the ranks; returns each rank's facts and measurements."""
    from ..launcher import launch
    from ._measure import run_rank

    # Inherited by every rank: NVLink multicast off, whatever the caller's environment says.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    gpu = config["device"] == "cuda"
    return launch(run_rank, config["nprocs"], args=(config,), devices=None if gpu else "cpu",
                  start_method="spawn" if gpu else "forkserver", timeout=timeout)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return os.environ.get("DISTRIB_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DISTRIB_GIT_COMMIT", "unknown")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args)
    print(f"all-reduce benchmark: {config['nprocs']} {config['device']} ranks, "
          f"{len(config['sizes'])} sizes, {config['dtypes']}, {config['modes']}", file=sys.stderr)
    per_rank = run(config, args.timeout)
    first = per_rank[0]
    meta = {"device_name": first["device_name"], "nprocs": config["nprocs"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit or git_commit(), "host": platform.node(), "torch": first["torch"],
            "torch_nccl": first.get("torch_nccl"), "distrib_nccl": first.get("distrib_nccl"),
            "dispatcher_chain": first.get("dispatcher_chain"), "config": config,
            "environment": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}
    summary = _report.summarize(per_rank, meta)
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="distrib-bench-smoke-" if args.smoke else "distrib-bench-allreduce-"))
    out.mkdir(parents=True, exist_ok=True)
    _report.write_json(summary, out / "allreduce.json")
    table = _report.markdown(summary)
    (out / "allreduce.md").write_text(table)
    why_no_plot = _report.plot(summary, out / "allreduce.png")
    print(table)
    print(f"wrote {out / 'allreduce.json'}, {out / 'allreduce.md'}"
          + (f", {out / 'allreduce.png'}" if why_no_plot is None else f" (no plot: {why_no_plot})"),
          file=sys.stderr)
    ours_failed = [r for r in summary["results"]
                   if r["target"].startswith("distrib:") and (r["error"] or r["correct"] is False)]
    for r in ours_failed:
        print(f"FAILED {r['target']} {r['mode']} {r['dtype']} {_report.size_text(r['size'])}: "
              f"{r['error'] or 'wrong result'}", file=sys.stderr)
    return 1 if ours_failed else 0
