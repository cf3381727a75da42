"""Every listening socket of this rank and of its launcher's process tree, while every socket a launch
opens is open: the store, the monitor, the Coordinator's and the gloo Communicator's gloo
devices, a broadcast channel. Prints one result line per rank."""
import json
import os

import psutil
import torch

import distrib
from distrib import communicator


def listening(pid: int, with_children: bool = False) -> list[str]:
    process = psutil.Process(pid)
    found = set()
    for p in [process, *(process.children(recursive=True) if with_children else [])]:
        connections = getattr(p, "net_connections", p.connections)("inet")
        found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return sorted(found)


ctx = distrib.init(timeout=60)
comm = communicator.create()
t = torch.ones(4)
comm.all_reduce(t)
channel = ctx.coordinator.broadcast_channel(src=0)
if channel.is_writer:
    channel.send({"hello": 1})
else:
    channel.recv()
ctx.coordinator.barrier()
record = {"rank": ctx.rank, "node": ctx.info.node_rank, "rank_listens": listening(os.getpid()),
          # the launcher with its helpers (one node's store process) and its ranks
          "launcher_listens": listening(os.getppid(), with_children=True) if ctx.info.local_rank == 0 else []}
ctx.coordinator.barrier()
print("RESULT " + json.dumps(record), flush=True)
channel.close()
distrib.shutdown()
