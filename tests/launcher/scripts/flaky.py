"""Fails (rank argv[1] raises) on the attempts below argv[2]; then every rank succeeds.

Prints the torchelastic variables it sees, and which attempt it is."""
import os
import sys
import time

bad, fail_until = int(sys.argv[1]), int(sys.argv[2])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
print(f"attempt={attempt} rank={rank} max={os.environ['TORCHELASTIC_MAX_RESTARTS']} "
      f"error_file={os.environ['TORCHELASTIC_ERROR_FILE']} launch={os.environ['DISTRIB_LAUNCH_ID']} "
      f"pid={os.getpid()}", flush=True)
if attempt < fail_until:
    if rank == bad:
        time.sleep(0.3)
        raise ValueError(f"attempt {attempt} fails on rank {rank}")
    time.sleep(60)
