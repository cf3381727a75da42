"""TP=2 x PP=2 over two nodes of two ranks: TP inside a node, PP across nodes, on gloo; the
custom all-reduce and the IPC send/recv refuse the PP groups, which span nodes. Prints one
result line per rank."""
import json

import torch

import distrib
from distrib import communicator
from distrib.communicator.custom import CustomAllReduceCommunicator
from distrib.communicator.ipc import IpcCommunicator

ctx = distrib.init(timeout=60)
layout = distrib.parallel.layout(tp=2, pp=2)
tp, pp = communicator.create(layout.tp), communicator.create(layout.pp)
x = torch.full((64,), float(ctx.rank + 1))
tp.all_reduce(x)
hidden = torch.arange(1000.0) + 10 * ctx.rank
if layout.is_first_stage:
    pp.send(hidden, 1)
    pp.send_tensor_dict({"hidden": hidden, "step": 3}, 1)
    received = None
else:
    got = torch.empty(1000)
    pp.recv(got, 0)
    d = pp.recv_tensor_dict(0)
    received = {"first": got[:3].tolist(), "dict": d["hidden"][:3].tolist(), "step": d["step"]}
print("RESULT " + json.dumps({
    "rank": ctx.rank, "node": ctx.info.node_rank,
    "tp": {"ranks": layout.tp.ranks, "nnodes": layout.tp.nnodes, "sum": x[0].item(),
           "local": [layout.tp.local_rank, layout.tp.local_world_size]},
    "pp": {"ranks": layout.pp.ranks, "nnodes": layout.pp.nnodes, "node_rank": layout.pp.node_rank,
           "local": [layout.pp.local_rank, layout.pp.local_world_size], "received": received,
           "custom": CustomAllReduceCommunicator.unavailable_reason(layout.pp, 0),
           "ipc": IpcCommunicator.unavailable_reason(layout.pp, 0),
           "disabled": pp.disabled, "chain": [c.name for c in pp.chain]},
}), flush=True)
tp.close()
pp.close()
layout.close()
distrib.shutdown()
