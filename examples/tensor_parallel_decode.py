"""Tensor-parallel decode: a Llama-style model on 2 or 4 GPUs, three ways to all-reduce, timed.

    python examples/tensor_parallel_decode.py                      # every GPU, llama-70b, all three
    python examples/tensor_parallel_decode.py --nprocs 2 --model llama-8b --comm dispatcher,torch
    distrib-run --nprocs 4 examples/tensor_parallel_decode.py --model llama-70b
    python examples/tensor_parallel_decode.py --device cpu         # 2 CPU ranks, tiny model, gloo
    python examples/tensor_parallel_decode.py --devices 0,0        # TP=2 on one GPU: the largest model that fits
    python examples/tensor_parallel_decode.py --compile            # the decode step through torch.compile
    python examples/tensor_parallel_decode.py --device cpu --pp 2 --check-tp1   # TP=2 x PP=2 on 4 CPU ranks
    distrib-run --nprocs 8 examples/tensor_parallel_decode.py --pp 2           # TP=4 x PP=2 on 8 GPUs

Each rank holds its shard of a bf16 decoder with random weights (RMSNorm,
attention with a KV cache and grouped-query heads, gated MLP; column-parallel
then row-parallel projections, so one all-reduce after attention and one after
the MLP per layer). One decode step (B sequences, one new token each, all
layers and the LM head) is captured in a CUDA graph per batch size and
replayed, once with each communicator:

- ``dispatcher``: distrib's dispatcher (custom P2P all-reduce kernel, NCCL fallback);
- ``nccl``: distrib's NCCL through CuPy, alone;
- ``torch``: ``torch.distributed`` NCCL, the outside peer.

With ``--pp N`` the ranks are ``tp x N`` (``tp`` = ranks / N; on CPUs the
default is 2 x N ranks): the layers are cut into N contiguous pipeline
stages of TP groups (``distrib.parallel.layout``), the new tokens enter stage
0, the final norm and LM head run on the last stage, and each TP rank sends
its hidden state to the same TP rank of the next stage (``send``/``recv``
of the contender: distrib's communicator on the pipeline group, or
``torch.distributed``). Decode is autoregressive, so the last stage hands
its tokens back to stage 0 and a timed step is the whole pipeline, every
stage in turn, for one batch. On GPUs each rank's part of a step (its
sends and receives included: CUDA IPC or NCCL) is one CUDA graph, as
without stages, except where a contender's sends between stages would go
through host memory (gloo, e.g. ranks sharing a GPU with distrib's ipc
communicator disabled): those steps are timed eager, and the output says
so. ``--compile`` compiles each stage's layers and head; the sends between
stages stay eager. Every contender runs with stages; torch.distributed's
and distrib's NCCL need one GPU per rank (NCCL refuses shared GPUs).
Results go to ``./tp-decode-results/<N>x<GPU>/tp<T>-pp<P>`` (under the current
directory, never the source tree) unless ``--out``.

Ranks that share a GPU (``--devices 0,0``, or ``distrib-run --share-gpu``)
share its memory: without ``--model`` they build the largest model whose
layers all fit in its free memory (every rank's shard, the unsplit model of
the TP=1 check, and a reserve per rank; ``tensor_parallel/fit.py``), and say
which. A named model gets as many layers as fit, and one that does not fit at
all is an error naming the sizes, before any rank builds its part.

Before timing, every communicator must give the same logits (within bf16
tolerance) and exact sums; ``--check-tp1`` also compares the logits with
one unsplit model (TP=1, PP=1) on rank 0, which is what catches a pipeline
handoff that every communicator gets wrong alike. Prints per-token latency
and tokens/s per batch size with the ratio to torch, and the GPU memory
each communicator's graphs add; writes ``tp-decode-<model>.json``, ``.md``
and ``.png`` to ``--out``.
On CPUs there are no CUDA graphs: eager steps are timed, distrib's NCCL is
skipped, and the dispatcher and torch.distributed both use gloo (a smoke run).

With ``--compile`` the decode step is ``torch.compile(step, fullgraph=True)``
for every contender, all-reduces included (distrib's are traced as its
PyTorch operators; the code of the step does not change): compiled once per
contender, warmed up outside the capture, then captured in the CUDA graphs as
before, inside ``comm.capture()``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import distrib
from distrib.info import ranks_sharing_a_gpu
from tensor_parallel import report
from tensor_parallel.comms import COMM_FLAGS
from tensor_parallel.measure import run_rank
from tensor_parallel.model import SHAPES

DEFAULT_OUT = "tp-decode-results"  # under the current directory
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def rank_main(config: dict) -> Optional[dict]:
    """What every rank runs (under ``distrib.launch`` or ``distrib-run``); rank 0 reports.

    Returns, on rank 0, ``{"out": directory, "check_passed": bool}``; None elsewhere.
    """
    record = run_rank(config)
    if record is None:
        return None
    meta = {key: config[key] for key in ("date", "commit", "host", "batch_sizes", "steps", "warmup", "seed",
                                         "compile")}
    gpu = config["device"] == "cuda"
    ranks = record["tp"] * record["pp"]
    eager = sorted(label for label, details in record["contenders"].items() if details.get("timing"))
    timing = "CUDA-graph replay timed with CUDA events" if gpu else \
        "eager steps timed with the wall clock (CPU: no CUDA graphs)"
    if eager:
        timing += f" ({', '.join(eager)}: eager steps timed with CUDA events, no graphs; see its notes)"
    if record["pp"] > 1:
        timing = (f"whole pipelined steps ({record['pp']} stages in turn, tokens back to the first); "
                  + timing)
    meta.update(device=config["device"], gpus=ranks if gpu else 0,
                timing=(f"compiled (torch.compile, {config['compile']}), " if config["compile"] else "") + timing,
                timing_ranks="per step, the slowest rank's time; then the median over steps",
                environment={"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE") if gpu else None})
    if config.get("shared_gpu"):
        meta.update(gpus=len(set(config["devices"])), shared_gpu=(
            f"{ranks} ranks on {len(set(config['devices']))} GPU(s): a correctness run. The timings "
            "do not measure communication (the ranks' kernels share one GPU)"))
    summary = report.summarize(meta, record)
    device_tag = "CPU" if not gpu else summary["meta"]["device_name"].split()[-1]
    split = f"tp{record['tp']}" + (f"-pp{record['pp']}" if record["pp"] > 1 else "")
    folder = (f"{meta['gpus']}x{device_tag}/shared-{split}" if config.get("shared_gpu")
              else f"{ranks}x{device_tag}" + (f"/{split}" if record["pp"] > 1 else ""))
    out = Path(config["out"]) if config["out"] else Path(config["default_out"]) / folder
    print(report.console(summary), flush=True)
    if config.get("shared_gpu"):
        print(f"NOTE: {meta['shared_gpu']}.", flush=True)
    for line in report.write(summary, out):
        print(line, file=sys.stderr)
    if not config["out"]:
        print(f"[tp-decode] results in {out} (--out chooses another folder)", file=sys.stderr)
    return {"out": str(out), "check_passed": summary["check"]["passed"]}


# -- command line ------------------------------------------------------------------------

def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 1,2,4,8")
    return sizes


def _comms(text: str) -> tuple[str, ...]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return COMM_FLAGS
    unknown = [n for n in names if n not in COMM_FLAGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected all, or some of {', '.join(COMM_FLAGS)} "
                                         "separated by commas")
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comm", type=_comms, default=COMM_FLAGS, metavar="{dispatcher,nccl,torch,all}",
                        help="communicators to run, comma-separated (default all, one after another, same weights)")
    parser.add_argument("--model", choices=sorted(SHAPES), default=None,
                        help="shape preset (default llama-70b on GPUs, tiny on CPUs; where ranks share a GPU, "
                             "the largest whose layers fit in its free memory)")
    parser.add_argument("--layers", type=int, default=None,
                        help="build this many layers (default the preset's; fewer where GPU memory requires)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=DEFAULT_BATCH_SIZES,
                        help="one CUDA graph per batch size (default 1,2,4,8,16,32,64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 100; 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; 2 on CPU)")
    parser.add_argument("--nprocs", type=int, default=None,
                        help="ranks = tensor-parallel degree x --pp (default every visible GPU; 2 x --pp on "
                             "CPU); under distrib-run the launch decides")
    parser.add_argument("--pp", type=int, default=1,
                        help="pipeline stages (default 1); the layers are cut into this many contiguous "
                             "stages, each run by ranks / pp tensor-parallel ranks")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--devices", default=None, metavar="0,0",
                        help="the GPU of each rank; a repeated GPU is shared (0,0: TP 2 on one GPU, for "
                             "correctness only: timings then do not measure communication; only the "
                             "dispatcher runs, NCCL refuses two ranks on one GPU)")
    parser.add_argument("--check-tp1", action="store_true",
                        help="also check the logits against one unsplit model on rank 0 (TP=1, PP=1; on "
                             "by default when ranks share a GPU)")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default ./{DEFAULT_OUT}/<N>x<GPU> under the current "
                             "directory, e.g. 4xH200, and <N>x<GPU>/tp<T>-pp<P> with --pp)")
    parser.add_argument("--seed", type=int, default=0, help="weights, KV cache and inputs (default 0)")
    parser.add_argument("--check-rtol", type=float, default=0.15,
                        help="largest relative error between communicators' logits (default 0.15; "
                             "rounding differences reach ~0.06 after 80 layers, a wrong sum ~1)")
    parser.add_argument("--break-comm", choices=COMM_FLAGS, default=None,
                        help="testing aid: make this communicator's all-reduce a no-op, so the check must fail")
    parser.add_argument("--break-handoff", choices=COMM_FLAGS, default=None,
                        help="testing aid (with --pp > 1): this communicator's sends between stages send "
                             "zeros, so the check must fail")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the decode step through torch.compile(fullgraph=True) with this backend "
                             "(default inductor; aot_eager compiles faster)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole launch")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    return parser


def config_from(args: argparse.Namespace, world_size: Optional[int]) -> dict:
    """The per-rank config; ``world_size`` is the launch's when a launcher already started us."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this PyTorch")
    devices = [int(d) for d in args.devices.split(",")] if args.devices else None
    if devices is not None and device != "cuda":
        raise SystemExit("--devices names GPUs; it needs --device cuda (or a visible GPU)")
    if devices is not None and args.nprocs not in (None, len(devices)):
        raise SystemExit(f"--nprocs {args.nprocs} but --devices names {len(devices)} GPUs")
    shared = devices is not None and len(set(devices)) < len(devices)
    comms = tuple(args.comm)
    if shared:
        refused = [c for c in comms if c != "dispatcher"]
        if refused and args.comm != COMM_FLAGS:
            raise SystemExit(f"--comm {','.join(refused)}: NCCL refuses two ranks on one GPU, and "
                             "--devices repeats one; only the dispatcher (custom kernel) runs there")
        comms = ("dispatcher",)
    pp = args.pp
    if pp < 1:
        raise SystemExit("--pp must be at least 1")
    nprocs = world_size or (len(devices) if devices else None) or args.nprocs or (
        torch.cuda.device_count() if device == "cuda" else 2 * pp)
    if device == "cuda" and world_size is None and devices is None and nprocs > torch.cuda.device_count():
        raise SystemExit(f"--nprocs {nprocs}: only {torch.cuda.device_count()} GPUs are visible "
                         "(--devices 0,0,... shares one)")
    steps = args.steps if args.steps is not None else (100 if device == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 2)
    for name, value, least in (("--nprocs", nprocs, 1), ("--steps", steps, 1), ("--warmup", warmup, 0),
                               ("--layers", args.layers if args.layers is not None else 1, 1)):
        if value < least:
            raise SystemExit(f"{name} must be at least {least}")
    if nprocs % pp:
        raise SystemExit(f"--pp {pp} does not divide the {nprocs} ranks: ranks = tensor-parallel degree x --pp")
    if args.break_handoff and pp == 1:
        raise SystemExit("--break-handoff breaks the sends between pipeline stages; it needs --pp 2 or more")
    tp = nprocs // pp
    # Ranks sharing a GPU (--devices 0,0; distrib-run --share-gpu, where the launcher says so) get no
    # default model: the ranks pick the largest that fits in its free memory (tensor_parallel/fit.py).
    sharing = shared or (world_size is not None and device == "cuda" and ranks_sharing_a_gpu() > 1)
    model = args.model or (None if sharing else "llama-70b" if device == "cuda" else "tiny")
    if model is not None:
        problem = SHAPES[model].problem_with(tp)
        if problem is not None:
            raise SystemExit(f"--model {model} on {tp} ranks per stage: {problem}")
    layers = args.layers or (SHAPES[model].layers if model else None)
    if layers is not None and layers < pp:
        raise SystemExit(f"--pp {pp}: {layers} layers cannot be cut into {pp} stages of at least one layer each")
    from distrib.bench.allreduce import git_commit

    return {"model": model, "layers": args.layers, "batch_sizes": list(args.batch_sizes), "steps": steps,
            "warmup": warmup, "comms": list(comms), "device": device, "nprocs": nprocs, "pp": pp, "seed": args.seed,
            "devices": devices, "shared_gpu": shared, "check_tp1": args.check_tp1 or shared,
            "check_rtol": args.check_rtol, "break_comm": args.break_comm, "break_handoff": args.break_handoff,
            "out": args.out, "default_out": os.path.abspath(DEFAULT_OUT), "compile": args.compile,
            "commit": args.commit or git_commit(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("RANK") and os.environ.get("WORLD_SIZE"):
        # Started by distrib-run (or torchrun): this process is one rank of the launch.
        config = config_from(args, int(os.environ["WORLD_SIZE"]))
        rank_main(config)
        return 0
    config = config_from(args, None)
    gpu = config["device"] == "cuda"
    if gpu:
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by every rank: NVLink multicast stays off
    split = f" (TP={config['nprocs'] // config['pp']} x PP={config['pp']})" if config["pp"] > 1 else ""
    model = config["model"] or "the largest model that fits in the shared GPU's free memory"
    print(f"[tp-decode] launching {config['nprocs']} {config['device']} ranks{split}: {model}, "
          f"{','.join(config['comms'])}", file=sys.stderr, flush=True)
    try:
        results = distrib.launch(rank_main, config["nprocs"], args=(config,), timeout=args.timeout,
                                 devices=(config["devices"] if gpu else "cpu"), share_gpu=config["shared_gpu"],
                                 start_method="spawn" if gpu else "forkserver")
    except distrib.WorkerFailedError as exc:
        root = exc.root_cause
        if (root.exc_type or "").rsplit(".", 1)[-1] == "DoesNotFit":  # every rank said it; no traceback needed
            print(f"[tp-decode] {root.message}", file=sys.stderr)
            return 2
        print(f"[tp-decode] failed: {exc}", file=sys.stderr)
        return 1
    return 0 if results[0]["check_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
