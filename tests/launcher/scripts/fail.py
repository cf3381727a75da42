"""Fails in the way argv[1] says, on the rank argv[2] names; the other ranks wait.

modes: raise (ValueError), exit7 (sys.exit(7)), sigkill (kills itself), ok
A rank named in argv[3] (optional) ignores SIGTERM and raises RuntimeError 1 s
after the failure, so that two ranks fail on their own.
"""
import os
import signal
import sys
import time

mode, bad = sys.argv[1], int(sys.argv[2])
late = int(sys.argv[3]) if len(sys.argv) > 3 else -1
rank = int(os.environ["RANK"])


def explode():
    raise ValueError(f"rank {rank} exploded on purpose")


if rank == bad:
    time.sleep(0.3)
    if mode == "raise":
        explode()
    if mode == "exit7":
        sys.exit(7)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(0)
if rank == late:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1.5)
    raise RuntimeError(f"rank {rank} failed later")
time.sleep(60)
