"""The ``nodes`` section of ``python -m distrib.bench faults``: a lost node, many times over.

Two ``distrib-run`` on this host, node 0 and node 1 of one launch (loopback), with
their ranks waiting in a barrier; then one node's launcher is SIGKILLed (its sockets
close), or its launcher and ranks are all SIGSTOPped (its sockets stay open, nothing
more comes). Per scenario: the time from the fault until the surviving launcher has
exited and its ranks are gone (a stopped node's processes are killed then), orphans
(processes of the launch alive 10 s later) and misnamed runs (the survivor's error does
not name the lost node). The bound is 2 s for a killed launcher, 10 s for a silent node.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from .faults import MARK_VAR, _wait_gone, marked_processes, summarize

KINDS = ("sigkill", "sigstop")
BOUND = {"sigkill": 2.0, "sigstop": 10.0}
_NPROCS = 2  # ranks per node


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def run_once(lost: int, kind: str) -> dict:
    from . import _fault_rank

    mark = uuid.uuid4().hex
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="distrib-fault-nodes-") as folder:
        env = {**os.environ, MARK_VAR: mark, "DISTRIB_FAULT_DIR": folder, "DISTRIB_FAULT_KIND": "none",
               "DISTRIB_FAULT_STAGE": "hold", "PYTHONUNBUFFERED": "1",
               "DISTRIB_KEY_FILE": os.path.join(folder, "key")}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTRIB_LAUNCH_ID",
                     "DISTRIB_SECRET"):
            env.pop(name, None)
        nodes, errs, frozen = [], [], []
        for k in (0, 1):
            err = open(os.path.join(folder, f"node{k}.err"), "w+b")
            errs.append(err)
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "distrib.cli", "--nnodes", "2", "--node-rank", str(k), "--master-addr",
                 "127.0.0.1", "--master-port", str(port), "--nprocs", str(_NPROCS), "--grace", "2",
                 _fault_rank.__file__], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        try:
            ready = [os.path.join(folder, f"ready.{r}") for r in range(1, 2 * _NPROCS)]
            deadline = time.monotonic() + 120
            while not all(os.path.exists(p) for p in ready) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # inside the barrier by now
            frozen = _tree(nodes[lost].pid) if kind == "sigstop" else []
            fault_at = time.time()
            for pid in frozen or [nodes[lost].pid]:
                try:
                    os.kill(pid, signal.SIGSTOP if kind == "sigstop" else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            survivor = nodes[1 - lost]
            try:
                survivor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                survivor.kill()
                survivor.wait()
            exited_at = time.time()
        finally:
            for pid in frozen:
                try:
                    os.kill(pid, signal.SIGKILL)  # a stopped node: nothing else ends it
                except ProcessLookupError:
                    pass
            for node in nodes:
                if node.poll() is None:
                    node.kill()
                node.wait()
        # Every process of the launch gone (the killed launcher's ranks too, on their own).
        gone_at, orphans = _wait_gone(mark, exited_at)
        errs[1 - lost].seek(0)
        text = errs[1 - lost].read().decode(errors="replace")
        for err in errs:
            err.close()
        named = (survivor.returncode not in (0, None) and re.search(rf"lost node {lost} \(", text) is not None
                 and "root cause" not in text)  # the lost node, not a survivor's rank that lost its peers
        return {"seconds": max(exited_at, gone_at) - fault_at,
                "orphans": orphans, "named": named,
                "detail": "" if named else f"exit {survivor.returncode}: {text[-300:]!r}"}


def nodes(repeat: int) -> list[dict]:
    """Every scenario ``repeat`` times: rows as the faults section has them, plus the bound."""
    rows = []
    for kind in KINDS:
        for lost in (1, 0):
            runs = [run_once(lost, kind) for _ in range(repeat)]
            row = summarize(f"run/node{lost}/{kind}", runs)
            seconds = [r["seconds"] for r in runs]
            row.update(bound_s=BOUND[kind], over_bound=sum(1 for s in seconds if s > BOUND[kind]))
            rows.append(row)
            print(f"{row['scenario']:<24} runs {row['runs']:>3}  median {row['median_s']:.2f}s  "
                  f"max {row['max_s']:.2f}s  over {BOUND[kind]:g}s {row['over_bound']}  orphans {row['orphans']}  "
                  f"misnamed {row['misnamed']}", flush=True)
    return rows
