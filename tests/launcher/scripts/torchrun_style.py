"""A script written for torchrun, unchanged: init_process_group(init_method="env://")."""
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
assert rank == int(os.environ["RANK"]) and world == int(os.environ["WORLD_SIZE"])
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} local {os.environ['LOCAL_RANK']} allreduce={t.item():g}", flush=True)
dist.barrier()
dist.destroy_process_group()
