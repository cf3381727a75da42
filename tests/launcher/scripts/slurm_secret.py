"""Under `distrib-run --launcher slurm`: print a digest of this task's secret, and whether the store holds it."""
import datetime
import hashlib
import os

import distrib
from torch.distributed import TCPStore

ctx = distrib.init(timeout=60)
secret = os.environ.get("DISTRIB_SECRET", "")
ctx.coordinator.barrier()  # every task has written what it writes
store = TCPStore(ctx.info.master_addr, ctx.info.master_port, None, is_master=False,
                 timeout=datetime.timedelta(seconds=30))
keys = store.list_keys()
leaked = [k for k in keys if secret and secret.encode() in store.get(k)]
print(f"SECRET rank {ctx.info.rank} sha256 {hashlib.sha256(secret.encode()).hexdigest()} "
      f"length {len(secret)} keys {len(keys)} leaked {leaked}", flush=True)
ctx.coordinator.barrier()
distrib.shutdown()
