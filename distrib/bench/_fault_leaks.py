"""Load, leaks and start-up for ``python -m distrib.bench faults --sections leaks,startup``.

- :func:`leaks`: many barriers and broadcasts on 8 ranks (each rank's descriptors,
  threads and memory after a warm-up and at the end), then many launches in a row
  of a trivial job (the launcher's descriptors, threads and memory before and after,
  and what is left behind: child processes, listening sockets, ``/dev/shm`` entries,
  ``distrib-*`` scratch folders).
- :func:`startup`: ``distrib.launch`` of a function that calls ``distrib.init()``
  and ``barrier()`` against ``torch.multiprocessing.spawn`` of one that calls
  ``init_process_group("gloo")`` and ``barrier()``, alternating, in one process;
  and how long a launch whose ranks all returned takes to return after the last one.
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time

__all__ = ["leaks", "startup"]


def _usage() -> dict:
    import psutil

    process = psutil.Process()
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": process.num_threads(), "rss_mib": round(process.memory_info().rss / 2**20, 1)}


def _load_rank(iterations: int, warmup: int) -> dict:
    import distrib

    coord = distrib.init(timeout=120).coordinator
    payload = b"x" * 64

    def round_trip():
        coord.barrier()
        coord.broadcast(payload if coord.rank == 0 else b"", src=0)

    for _ in range(warmup):
        round_trip()
    before = _usage()
    started = time.perf_counter()
    for _ in range(iterations):
        round_trip()
    seconds = time.perf_counter() - started
    return {"before": before, "after": _usage(), "seconds": seconds}


def _trivial() -> int:
    return int(os.environ["RANK"])


def _leftovers() -> dict:
    import psutil

    me = psutil.Process()
    connections = getattr(me, "net_connections", me.connections)("inet")
    return {"children": len(me.children(recursive=True)),
            "listening": sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in connections
                                 if c.status == psutil.CONN_LISTEN}),
            "shm": sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else [],
            "scratch": sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("distrib-"))}


def leaks(ranks: int = 8, iterations: int = 10_000, launches: int = 200) -> dict:
    import distrib

    load = distrib.launch(_load_rank, nprocs=ranks, args=(iterations, 100), timeout=3600)
    per_rank = {key: max(r["after"][key] - r["before"][key] for r in load)
                for key in ("fds", "threads", "os_threads", "rss_mib")}
    for _ in range(3):  # warm-up: imports, the first store, lazily made objects
        distrib.launch(_trivial, nprocs=2, timeout=120)
    before, left_before = _usage(), _leftovers()
    started = time.perf_counter()
    for _ in range(launches):
        distrib.launch(_trivial, nprocs=2, timeout=120)
    seconds = time.perf_counter() - started
    after, left_after = _usage(), _leftovers()
    return {
        "load": {"ranks": ranks, "barriers_and_broadcasts": iterations,
                 "seconds": round(max(r["seconds"] for r in load), 2),
                 "max_growth_per_rank": per_rank},
        "launches": {"count": launches, "ranks": 2, "seconds": round(seconds, 1),
                     "launcher_before": before, "launcher_after": after,
                     "left_behind": {"children": left_after["children"] - left_before["children"],
                                     "listening": sorted(set(left_after["listening"]) - set(left_before["listening"])),
                                     "shm": sorted(set(left_after["shm"]) - set(left_before["shm"])),
                                     "scratch": sorted(set(left_after["scratch"]) - set(left_before["scratch"]))}},
    }


def _distrib_rank() -> float:
    import distrib

    distrib.init(timeout=120).coordinator.barrier()
    return time.time()


def _torch_rank(index: int, port: int, nprocs: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=index, world_size=nprocs)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(nprocs: int = 4, runs: int = 7) -> dict:
    import distrib
    import torch.multiprocessing as tmp

    ours, theirs, finish = [], [], []
    distrib.launch(_distrib_rank, nprocs=nprocs, timeout=120)  # warm-up: imports, page cache
    tmp.spawn(_torch_rank, args=(_free_port(), nprocs), nprocs=nprocs)
    for _ in range(runs):
        started = time.perf_counter()
        stamps = distrib.launch(_distrib_rank, nprocs=nprocs, timeout=120)
        ours.append(time.perf_counter() - started)
        finish.append(time.time() - max(stamps))
        started = time.perf_counter()
        tmp.spawn(_torch_rank, args=(_free_port(), nprocs), nprocs=nprocs)
        theirs.append(time.perf_counter() - started)
    return {"nprocs": nprocs, "runs": runs,
            "distrib_launch_s": {"median": round(statistics.median(ours), 3), "all": [round(x, 3) for x in ours]},
            "torch_spawn_gloo_s": {"median": round(statistics.median(theirs), 3),
                                   "all": [round(x, 3) for x in theirs]},
            "ratio_median": round(statistics.median(ours) / statistics.median(theirs), 3),
            "after_last_rank_returned_s": {"median": round(statistics.median(finish), 3),
                                           "max": round(max(finish), 3)}}
