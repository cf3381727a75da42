"""A data-parallel training script written for torchrun, run unchanged by distrib-run.

    distrib-run --nprocs 4 examples/train.py --lr 3e-4          # 4 CPU ranks (gloo), or one per GPU
    torchrun --nproc-per-node 4 examples/train.py --lr 3e-4     # the same script under torchrun

Each rank trains a small regression model on its own shard of random data with
``DistributedDataParallel``; ``torch.distributed.init_process_group`` reads the
launcher's environment (``env://``). Rank 0 prints the loss, and at the end every
rank checks that the replicas' weights are identical (DDP kept them in step).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step (default 32)")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights everywhere
    model = DistributedDataParallel(torch.nn.Linear(16, 1).to(device),
                                    device_ids=[local_rank] if gpu else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    truth = torch.arange(16.0, device=device) / 16
    data = torch.Generator(device="cpu").manual_seed(1 + rank)  # each rank its own shard
    for step in range(args.steps):
        x = torch.randn(args.batch, 16, generator=data).to(device)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), x @ truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({world} ranks)", flush=True)

    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if not all(torch.equal(g, weights) for g in gathered):
        raise RuntimeError("the replicas' weights differ: data parallelism lost its step")
    if rank == 0:
        print(f"done: {world} replicas in step after {args.steps} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
