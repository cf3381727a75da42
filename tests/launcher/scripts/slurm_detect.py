"""Started by plain `srun python slurm_detect.py`: distrib.init() must find SLURM on its own."""
import json

import distrib

ctx = distrib.init(timeout=60)
info = ctx.info
gathered = [int(b) for b in ctx.coordinator.all_gather(str(info.rank).encode())]
ctx.coordinator.barrier()
print("DETECTED " + json.dumps({
    "rank": info.rank, "world": info.world_size, "local_rank": info.local_rank,
    "local_world": info.local_world_size, "node": info.node_rank, "nnodes": info.nnodes,
    "master": info.master_addr, "port": info.master_port, "launch_id": info.launch_id,
    "gathered": gathered}), flush=True)
distrib.shutdown()
