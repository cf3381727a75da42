"""Rendezvous, the Coordinator (broadcast, barrier, all_gather) and a gloo all-reduce of
torch.distributed (env://), across every rank of every node. Prints one result line."""
import json
import os
import socket

import torch
import torch.distributed as dist

import distrib

ctx = distrib.init(timeout=60)
coord, rank, world = ctx.coordinator, ctx.rank, ctx.world_size
token = coord.broadcast(f"token-from-{socket.gethostname()}-{os.getpid()}".encode() if rank == 0 else b"")
coord.barrier()
gathered = [json.loads(b) for b in coord.all_gather(json.dumps(
    {"rank": rank, "node": ctx.info.node_rank, "master": ctx.info.master_addr}).encode())]
coord.local_barrier()

dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
dist.barrier()
dist.destroy_process_group()
print("RESULT " + json.dumps({"rank": rank, "world": world, "node": ctx.info.node_rank,
                              "token": token.decode(), "gathered": gathered, "sum": t.item(),
                              "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}),
      flush=True)
distrib.shutdown()
