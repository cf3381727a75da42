"""Writes many long lines in pieces, so that lines of different ranks would mix if the
launcher relayed bytes rather than whole lines."""
import os
import sys

rank = os.environ["RANK"]
for i in range(300):
    line = f"rank={rank} line={i} " + rank * 200
    half = len(line) // 2
    sys.stdout.write(line[:half])
    sys.stdout.flush()
    sys.stdout.write(line[half:] + "\n")
    sys.stdout.flush()
sys.stdout.write(f"rank={rank} no newline at the end")
