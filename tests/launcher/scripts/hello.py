"""Prints who it is; exits 0. Uses no torch, so it starts fast."""
import os
import sys

keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "NNODES",
        "MASTER_ADDR", "MASTER_PORT", "DISTRIB_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"]
print("hello " + " ".join(f"{k}={os.environ.get(k, '')}" for k in keys))
print(f"argv={sys.argv[1:]!r} name={__name__}")
print(f"stderr of rank {os.environ['RANK']}", file=sys.stderr)
