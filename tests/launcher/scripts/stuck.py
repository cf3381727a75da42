"""Ranks that get stuck in known places, for the hang-diagnosis tests.

    stuck.py coordinator          rank 1 waits in all_gather, the others in barrier(timeout=8)
    stuck.py gil SECONDS DIR      rank 1 holds the GIL in a C call; the others sleep
    stuck.py sleep SECONDS DIR    every rank sleeps, then exits 0
DIR gets a rankN.ready file once a rank is in place.
"""
import ctypes
import os
import sys
import time


def ready(folder: str) -> None:
    with open(os.path.join(folder, f"rank{os.environ['RANK']}.ready"), "w"):
        pass


def hold_the_gil(seconds: float) -> None:
    ctypes.PyDLL(None).sleep(int(seconds))  # PyDLL keeps the GIL during the call


def nap(seconds: float) -> None:
    time.sleep(seconds)


mode = sys.argv[1]
rank = int(os.environ["RANK"])
if mode == "coordinator":
    import distrib

    coord = distrib.init().coordinator
    if rank == 1:
        coord.all_gather(b"late", timeout=60)
    else:
        coord.barrier(timeout=8)  # long enough for every rank to get here, even on a busy machine
else:
    seconds, folder = float(sys.argv[2]), sys.argv[3]
    time.sleep(0.5)  # let the control agent say hello first
    ready(folder)
    if mode == "gil" and rank == 1:
        hold_the_gil(seconds)
    else:
        nap(seconds)
