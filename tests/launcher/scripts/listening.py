"""Every listening socket of this rank and of its launcher, while every socket a launch
opens is open: the store, the monitor, the Coordinator's and the gloo Communicator's gloo
devices, a broadcast channel. Prints one result line per rank."""
import json
import os

import psutil
import torch

import distrib
from distrib import communicator


def listening(pid: int) -> list[str]:
    process = psutil.Process(pid)
    connections = getattr(process, "net_connections", process.connections)("inet")
    return sorted({c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN})


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
          "launcher_listens": listening(os.getppid()) if ctx.info.local_rank == 0 else []}
ctx.coordinator.barrier()
print("RESULT " + json.dumps(record), flush=True)
channel.close()
distrib.shutdown()
