"""Starts the Coordinator on every rank, reports ready in argv[1]/rank<N>.pids, then
waits in repeated barriers with a long timeout (until a peer disappears)."""
import os
import sys
import time

import distrib

ctx = distrib.init(timeout=120)
ctx.coordinator.barrier()
folder = sys.argv[1]
tmp = os.path.join(folder, f"rank{ctx.rank}.pids.tmp")
with open(tmp, "w") as f:
    f.write(f"{os.getpid()}")
os.replace(tmp, os.path.join(folder, f"rank{ctx.rank}.pids"))
print(f"rank {ctx.rank} ready", flush=True)
while True:
    ctx.coordinator.barrier(timeout=120)
    time.sleep(0.2)
