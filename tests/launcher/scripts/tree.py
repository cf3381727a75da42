"""Each rank starts a child process (a grandchild of the launcher), writes both pids
to argv[1]/rank<N>.pids, notes a SIGINT in argv[1]/rank<N>.sigint, and waits.

With argv[2] == "ignore-term" the rank ignores SIGTERM (so only SIGKILL stops it).
"""
import os
import signal
import subprocess
import sys
import time

folder = sys.argv[1]
rank = os.environ["RANK"]
if len(sys.argv) > 2 and sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def on_sigint(signum, frame):
    with open(os.path.join(folder, f"rank{rank}.sigint"), "w") as f:
        f.write("1")
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, on_sigint)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
tmp = os.path.join(folder, f"rank{rank}.pids.tmp")
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(tmp, os.path.join(folder, f"rank{rank}.pids"))
print(f"rank {rank} ready", flush=True)
while True:
    time.sleep(0.1)
