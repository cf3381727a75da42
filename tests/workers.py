"""Worker functions for tests that launch processes (importable by spawned workers)."""
from __future__ import annotations

import os
import signal
import time

import distrib


def rank_times(x):
    ctx = distrib.init()
    ctx.coordinator.barrier()
    return ctx.info.rank * x


def info_and_env():
    ctx = distrib.init()
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                          "MASTER_PORT", "DISTRIB_DEVICE", "TORCHELASTIC_USE_AGENT_STORE")}
    return ctx.info, env, os.getpid()


def raise_on(rank_to_fail, pidfile=None):
    ctx = distrib.init()
    _record_pid(pidfile, ctx.info.rank)
    if ctx.info.rank == rank_to_fail:
        time.sleep(0.3)
        raise ValueError(f"boom from rank {ctx.info.rank}")
    time.sleep(60)


def sigkill_on(rank_to_fail):
    rank = int(os.environ["RANK"])
    if rank == rank_to_fail:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def hang_on(rank_to_hang):
    rank = int(os.environ["RANK"])
    if rank == rank_to_hang:
        time.sleep(600)
    return rank


def exit_with(code):
    if int(os.environ["RANK"]) == 1:
        raise SystemExit(code)
    return "ok"


def sleep_forever(pidfile):
    _record_pid(pidfile, int(os.environ["RANK"]))
    time.sleep(600)


def return_unpicklable():
    return lambda: None


def coordinator_ops(big_size):
    ctx = distrib.init()
    c = ctx.coordinator
    import torch.distributed as dist

    out = {
        "default_group_initialized": dist.is_initialized(),
        "is_master": c.is_master(),
        "is_local_master": c.is_local_master(),
        "bcast": c.broadcast(b"hello" if c.rank == 0 else b"ignored", src=0),
        "bcast_src_last": c.broadcast(bytes([c.rank]) * 3, src=c.world_size - 1),
        "empty_bcast": c.broadcast(b"", src=0),
        "gather": c.all_gather(str(c.rank).encode() * c.rank),
        "empty_gather": c.all_gather(b""),
    }
    payload = bytes(range(256)) * (big_size // 256) if c.rank == 1 else b""
    big = c.broadcast(payload, src=1)
    out["big_ok"] = big == bytes(range(256)) * (big_size // 256)
    gathered = c.all_gather(bytes([c.rank]) * big_size)
    out["big_gather_ok"] = all(g == bytes([r]) * big_size for r, g in enumerate(gathered))
    c.barrier()
    c.local_barrier()
    return out


def op_with_missing(op, missing_rank, timeout):
    """Every rank but ``missing_rank`` runs coordinator ``op`` ("barrier" or "all_gather")."""
    ctx = distrib.init()
    if ctx.info.rank == missing_rank:
        time.sleep(timeout + 3)  # alive (not crashed) until the others time out
        return None
    call = {"barrier": lambda: ctx.coordinator.barrier(timeout=timeout),
            "all_gather": lambda: ctx.coordinator.all_gather(b"x", timeout=timeout)}[op]
    try:
        call()
    except distrib.DistribTimeoutError as exc:
        return ("timeout", exc.missing, str(exc))
    except distrib.DistribError as exc:
        return ("error", (), str(exc))
    return ("passed",)


def user_default_group_alongside():
    """The user's own env:// default group works next to our coordinator."""
    import torch
    import torch.distributed as dist

    ctx = distrib.init()
    dist.init_process_group("gloo", init_method="env://")
    t = torch.tensor([ctx.info.rank + 1.0])
    dist.all_reduce(t)
    ctx.coordinator.barrier()
    value = t.item()
    dist.destroy_process_group()
    return value, ctx.coordinator.broadcast(b"still fine")


def closed_coordinator_use():
    ctx = distrib.init()
    distrib.shutdown()
    try:
        ctx.coordinator.barrier()
    except distrib.CoordinatorError as exc:
        return str(exc)
    return None


def init_twice():
    a = distrib.init()
    b = distrib.init()
    return a is b, a.info.rank


def _record_pid(pidfile, rank):
    if pidfile:
        with open(f"{pidfile}.{rank}", "w") as f:
            f.write(str(os.getpid()))


def spawn_grandchild_then_fail(pidfile):
    """Rank 1 starts a long-lived child process; rank 0 fails."""
    import subprocess

    rank = int(os.environ["RANK"])
    if rank == 1:
        child = subprocess.Popen(["sleep", "600"])
        _record_pid(pidfile, 100 + rank)
        with open(f"{pidfile}.grandchild", "w") as f:
            f.write(str(child.pid))
        time.sleep(600)
    time.sleep(1.0)
    raise RuntimeError("rank 0 gives up")


def listening_sockets():
    """Where this rank and (rank 0) its launcher's tree listen, with every socket of a launch open."""
    import psutil
    import torch

    from distrib import communicator

    def listening(pid, with_children=False):
        process = psutil.Process(pid)
        found = set()
        for p in [process, *(process.children(recursive=True) if with_children else [])]:
            connections = getattr(p, "net_connections", p.connections)("inet")
            found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
        return sorted(found)

    ctx = distrib.init(timeout=60)
    comm = communicator.create()
    comm.all_reduce(torch.ones(4))
    channel = ctx.coordinator.broadcast_channel(src=0)
    channel.send({"hello": 1}) if channel.is_writer else channel.recv()
    ctx.coordinator.barrier()
    # The launcher with its helpers (the store's process) and its ranks.
    record = {"rank": listening(os.getpid()),
              "launcher": listening(os.getppid(), with_children=True) if ctx.rank == 0 else []}
    ctx.coordinator.barrier()
    channel.close()
    return record


def exit_early_on_rank0(code):
    """Rank 0 ends at once, before the others have even finished starting."""
    if int(os.environ["RANK"]) == 0:
        os._exit(code)
    time.sleep(60)
