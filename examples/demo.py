"""distrib demo: launch 4 processes, set up the node once, coordinate, all-reduce.

    python examples/demo.py            # 4 processes; gloo on CPU, GPUs when present
    python examples/demo.py --nprocs 8
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import distrib


def work(shared_dir: str) -> dict:
    ctx = distrib.init()
    coord = ctx.coordinator
    rank, world = ctx.info.rank, ctx.info.world_size

    # Node-wide setup, once per node: the local master prepares, everyone waits.
    marker = os.path.join(shared_dir, f"node{ctx.info.node_rank}.ready")
    if coord.is_local_master():
        time.sleep(0.2)  # stands in for a download
        with open(marker, "w") as f:
            f.write("prepared by local rank 0\n")
    coord.barrier()
    assert os.path.exists(marker), "barrier returned before the local master finished"

    # The master decides something; everyone gets it.
    plan = coord.broadcast(b"batch=32;lr=3e-4" if coord.is_master() else b"")
    # Everyone reports in.
    who = coord.all_gather(f"{socket.gethostname()}:{os.getpid()}".encode())

    # Tensor data: the communicator picks the fastest path for the tensor.
    import torch

    from distrib import communicator

    device = f"cuda:{ctx.device}" if ctx.device is not None else "cpu"
    with communicator.create(ctx.coordinator, device=ctx.device) as comm:
        x = torch.full((1024,), float(rank + 1), device=device)
        path = comm.communicator_for(x).name
        comm.all_reduce(x)
        total = x[0].item()

    return {"rank": rank, "world": world, "plan": plan.decode(), "peers": len(who),
            "sum": total, "expected": world * (world + 1) / 2, "path": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as shared_dir:
        results = distrib.launch(work, nprocs=args.nprocs, args=(shared_dir,), timeout=300,
                                 devices=None)
    elapsed = time.perf_counter() - start
    print(f"distrib demo: {args.nprocs} processes, {elapsed:.1f}s from launch to results")
    print(f"  node setup ran once per node, then a barrier; plan broadcast: {results[0]['plan']!r}")
    print(f"  all_gather: every rank saw {results[0]['peers']} peers")
    print(f"  all_reduce of rank+1 over {args.nprocs} ranks:")
    for r in results:
        ok = "ok" if r["sum"] == r["expected"] else "WRONG"
        print(f"    rank {r['rank']}: {r['sum']:g} (expected {r['expected']:g}, {ok}) via {r['path']}")
    if any(r["sum"] != r["expected"] for r in results):
        raise SystemExit("demo failed: wrong all-reduce result")


if __name__ == "__main__":
    main()
