"""``python -m distrib.bench channel``: one-way latency of a broadcast from rank 0, channel vs gloo.

Launches ``--nprocs`` CPU ranks on this machine with ``distrib.launch``. Rank 0
sends messages of 1 KiB and 1 MiB (a msgpack dict carrying the send time and
the payload) to every other rank, through the broadcast channel
(``Coordinator.broadcast_channel``: a shared-memory ring here) and through
``Coordinator.broadcast`` (gloo), in the same run. A sample is one reader's
receipt time minus the writer's clock stamp taken just before its send call
(same machine, same monotonic clock), so it covers encoding, the transfer and
decoding. p50 and p99 are over every reader's samples.

Each iteration is unloaded: a Coordinator barrier (not timed), then the
writer waits ``--settle-ms`` so that every reader is already waiting, then
sends; after its send or receipt each rank pauses ``--settle-ms`` again, so
that ranks that are done do not load the machine while others still
receive (the next barrier's traffic would). The "idle" rows wait
``--idle-ms`` (plus a random 0-2 ms) instead, longer than the channel's spin
phase, so its readers are asleep in their back-off when the message comes.
``--zmq`` adds the channel with every reader on zmq (as if on other nodes).

Writes ``channel.np<N>.json`` and ``channel.np<N>.md`` to ``--out`` and prints
the table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from . import _report

KIB, MIB = 1 << 10, 1 << 20
SIZES = (KIB, MIB)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench channel",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=8,
                        help="ranks: one writer, the rest readers (default 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: a temporary one)")
    parser.add_argument("--iters", type=int, default=2000, help="timed messages of 1 KiB (default 2000)")
    parser.add_argument("--iters-large", type=int, default=200, help="timed messages of 1 MiB (default 200)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed messages before each case")
    parser.add_argument("--settle-ms", type=float, default=1.0,
                        help="the writer's pause before each send, and every rank's after it (default 1)")
    parser.add_argument("--idle-ms", type=float, default=30.0,
                        help="the pause of the idle rows (0: no idle rows; default 30)")
    parser.add_argument("--idle-iters", type=int, default=100, help="timed messages of the idle rows")
    parser.add_argument("--zmq", action="store_true",
                        help="also measure the channel with every reader on zmq")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole launch")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    return parser


# -- in each rank -------------------------------------------------------------------------

def run_rank(config: dict) -> dict:
    """Entry point of each launched rank: the reader's latency samples (ns) per case."""
    import distrib
    from ..control.channel import BroadcastChannel

    ctx = distrib.init()
    coord = ctx.coordinator
    targets: dict[str, Optional[BroadcastChannel]] = {"channel": coord.broadcast_channel(0)}
    if config["zmq"]:
        targets["channel-zmq"] = BroadcastChannel.create(coord, 0, shared_memory=False)
    targets["gloo"] = None
    samples = []
    try:
        for case in config["cases"]:
            for name, channel in targets.items():
                times = _measure(coord, channel, case, config)
                samples.append({"target": name, **case, "ns": times})
    finally:
        for channel in targets.values():
            if channel is not None:
                channel.close()
    return {"rank": ctx.rank, "samples": samples, "torch": _version("torch"),
            "pyzmq": _version("zmq"), "msgpack": _version("msgpack")}


def _measure(coord, channel, case: dict, config: dict) -> list[int]:
    from ..control import codec

    payload = os.urandom(case["size"])
    writer = coord.rank == 0
    pause, settle = case["pause_ms"] / 1e3, config["settle_ms"] / 1e3
    jitter = random.Random(0)
    times = []
    for i in range(config["warmup"] + case["iters"]):
        # Untimed: everyone arrives, then the writer lets the readers start waiting.
        coord.barrier()
        if writer:
            # Idle rows: a random phase against the readers' back-off sleeps.
            time.sleep(pause + jitter.random() * case["jitter_ms"] / 1e3)
            sent = time.perf_counter_ns()
            message = {"sent_ns": sent, "data": payload}
            if channel is not None:
                channel.send(message)
            else:
                coord.broadcast(codec.encode(message), src=0)
        else:
            if channel is not None:
                message = channel.recv()
            else:
                message = codec.decode(coord.broadcast(b"", src=0))
            received = time.perf_counter_ns()
            if len(message["data"]) != case["size"]:
                raise RuntimeError(f"rank {coord.rank} received {len(message['data'])} bytes, "
                                   f"expected {case['size']}")
            if i >= config["warmup"]:
                times.append(received - message["sent_ns"])
        # Untimed: whoever is done stays quiet (out of the next barrier's network and
        # scheduler traffic) while the slower readers are still receiving.
        time.sleep(settle)
    return times


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - only recorded
        return None


# -- the launcher's side ------------------------------------------------------------------

def config_from(args: argparse.Namespace) -> dict:
    if args.nprocs < 2:
        raise SystemExit("--nprocs must be at least 2 (one writer, one reader)")
    cases = [{"size": KIB, "mode": "hot", "pause_ms": args.settle_ms, "jitter_ms": 0, "iters": args.iters},
             {"size": MIB, "mode": "hot", "pause_ms": args.settle_ms, "jitter_ms": 0,
              "iters": args.iters_large}]
    if args.idle_ms > 0 and args.idle_iters > 0:
        cases.append({"size": KIB, "mode": "idle", "pause_ms": args.idle_ms, "jitter_ms": 2.0,
                      "iters": args.idle_iters})
    return {"nprocs": args.nprocs, "cases": cases, "warmup": max(0, args.warmup), "zmq": args.zmq,
            "settle_ms": args.settle_ms}


def summarize(per_rank: list[dict], config: dict) -> list[dict]:
    results = []
    for index, first in enumerate(per_rank[0]["samples"]):
        samples = [s for facts in per_rank[1:] for s in facts["samples"][index]["ns"]]
        us = [s / 1e3 for s in samples]
        record = {k: first[k] for k in ("target", "size", "mode", "pause_ms", "jitter_ms", "iters")}
        record.update(samples=len(us), p50_us=_report.percentile(us, 50), p90_us=_report.percentile(us, 90),
                      p99_us=_report.percentile(us, 99), max_us=max(us), mean_us=sum(us) / len(us))
        results.append(record)
    for r in results:
        base = next(b for b in results if b["target"] == "gloo" and b["size"] == r["size"]
                    and b["mode"] == r["mode"])
        r["gloo_over_this_p50"] = base["p50_us"] / r["p50_us"]
        r["gloo_over_this_p99"] = base["p99_us"] / r["p99_us"]
    return results


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    import zmq

    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "libzmq": zmq.zmq_version()}


def markdown(summary: dict) -> str:
    meta, results = summary["meta"], summary["results"]
    lines = [f"# Broadcast latency: rank 0 to {meta['nprocs'] - 1} readers on one machine", "",
             f"{meta['date']} · commit `{meta['commit']}` · {meta['cpu_model']}, {meta['cpus_usable']} "
             f"cores · Python {meta['python']} · torch {meta['torch']} · pyzmq {meta['pyzmq']} "
             f"(libzmq {meta['libzmq']}) · msgpack {meta['msgpack']}", "",
             "One-way latency in µs from the writer's send call to a reader holding the decoded "
             "message (a dict with the payload and the send time), over every reader's samples. "
             "`channel`: `Coordinator.broadcast_channel` (the shared-memory ring); `channel-zmq`: "
             "the same with every reader on its zmq path, as if on other nodes; `gloo`: "
             "`Coordinator.broadcast`. Per message: a barrier, then the writer waits (\"readers "
             "waited\") and sends; nothing but the send and receipt is timed. hot: readers waiting "
             f"less than the channel's {meta['spin_ms']:g} ms spin phase (a worker between steps); "
             "idle: longer, so they are asleep in back-off (sleeps of up to "
             f"{meta['max_sleep_ms']:g} ms). ×: gloo's latency divided by this one's.", "",
             "| size | readers waited | target | samples | p50 | p90 | p99 | ×p50 | ×p99 |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = "" if r["target"] == "gloo" else f"{r['gloo_over_this_p50']:.1f}"
        ratio99 = "" if r["target"] == "gloo" else f"{r['gloo_over_this_p99']:.1f}"
        waited = f"{r['pause_ms']:g}" + (f"–{r['pause_ms'] + r['jitter_ms']:g}" if r["jitter_ms"] else "")
        lines.append(f"| {_report.size_text(r['size'])} | {r['mode']} ({waited} ms) | "
                     f"`{r['target']}` | {r['samples']} | {r['p50_us']:.1f} | {r['p90_us']:.1f} | "
                     f"{r['p99_us']:.1f} | {ratio} | {ratio99} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..control import _waiting
    from ..launcher import launch
    from .allreduce import git_commit

    args = build_parser().parse_args(argv)
    config = config_from(args)
    print(f"channel benchmark: {config['nprocs']} ranks on this machine", file=sys.stderr)
    per_rank = launch(run_rank, config["nprocs"], args=(config,), devices="cpu", start_method="forkserver",
                      timeout=args.timeout)
    first = per_rank[0]
    meta = {"nprocs": config["nprocs"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit or git_commit(), **machine(), "torch": first["torch"],
            "pyzmq": first["pyzmq"], "msgpack": first["msgpack"], "spin_ms": _waiting.SPIN_SECONDS * 1e3,
            "max_sleep_ms": _waiting.MAX_SLEEP * 1e3, "config": config}
    summary = {"meta": meta, "results": summarize(per_rank, config)}
    _report.save(summary, markdown(summary), args.out or Path(tempfile.mkdtemp(prefix="distrib-bench-channel-")),
                 f"channel.np{config['nprocs']}")
    return 0
