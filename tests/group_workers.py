"""Worker functions for the group tests (importable by spawned workers)."""
from __future__ import annotations

import threading
import time

import torch

import distrib
from distrib import communicator
from distrib.control.channel import ChannelClosed


def layout_collectives(tp, pp, dp):
    """Every collective of every group of a TP x PP x DP layout, on this rank."""
    ctx = distrib.init()
    world = ctx.coordinator
    layout = distrib.parallel.layout(tp=tp, pp=pp, dp=dp)
    out = {"coords": (layout.tp_rank, layout.pp_rank, layout.dp_rank),
           "sizes": (layout.tp_size, layout.pp_size, layout.dp_size),
           "stages": (layout.is_first_stage, layout.is_last_stage)}
    for name in ("tp", "pp", "dp"):
        group = getattr(layout, name)
        comm = communicator.create(group)
        x = torch.full((3, 5), float(world.rank + 1))
        comm.all_reduce(x)
        gathered = comm.all_gather(torch.tensor([world.rank], dtype=torch.int64))
        y = torch.full((4,), float(world.rank))
        comm.broadcast(y, src=group.world_size - 1)
        scattered = comm.reduce_scatter(torch.arange(2.0 * group.world_size) + world.rank)
        channel = group.broadcast_channel(src=0, timeout=30)
        message = channel.broadcast({"from": world.rank} if channel.is_writer else None)
        closed = None
        if channel.is_writer:
            channel.close()
        else:
            try:
                channel.recv()
            except ChannelClosed as exc:  # names the writer by its global rank
                closed = str(exc)
            channel.close()
        group.barrier()
        group.local_barrier()
        out[name] = {
            "ranks": group.ranks, "rank": group.rank, "world_size": group.world_size,
            "is_master": group.is_master(), "is_local_master": group.is_local_master(),
            "local": (group.local_rank, group.local_world_size, group.node_rank, group.nnodes),
            "all_gather": [g.decode() for g in group.all_gather(str(world.rank).encode())],
            "broadcast": group.broadcast(str(world.rank).encode(), src=group.world_size - 1).decode(),
            "all_reduce": x.unique().tolist(),
            "comm_all_gather": gathered.view(-1).tolist(),
            "comm_broadcast": y.unique().tolist(),
            "reduce_scatter": scattered.tolist(),
            "channel": message,
            "channel_closed": closed,
            "describe": group.describe(),
        }
        comm.close()
    layout.close()
    return out


def groups_from_threads(calls):
    """Two groups used at once from two threads: TP (pairs) and DP (stride 2), on 4 ranks."""
    ctx = distrib.init()
    world = ctx.coordinator
    layout = distrib.parallel.layout(tp=2, pp=1, dp=2)
    comms = {name: communicator.create(getattr(layout, name)) for name in ("tp", "dp")}
    results, errors = {}, []

    def use(name):
        group, comm, sums = getattr(layout, name), comms[name], []
        try:
            for i in range(calls):
                x = torch.full((8,), float(world.rank * 1000 + i))
                comm.all_reduce(x)
                sums.append(x[0].item())
                if i % 10 == 0:
                    group.barrier()
                    group.all_gather(b"%d" % i)
        except Exception as exc:  # noqa: BLE001 — reported to the test
            errors.append(f"{name}: {exc!r}")
        results[name] = sums

    threads = [threading.Thread(target=use, args=(name,)) for name in ("tp", "dp")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"ranks": {name: getattr(layout, name).ranks for name in ("tp", "dp")}, "sums": results,
            "errors": errors}


def outsider(sleep):
    """Ranks 0-2 form a group; rank 3 is in none (and busy), and nobody waits for it."""
    ctx = distrib.init()
    world = ctx.coordinator
    start = time.monotonic()
    group = world.group([0, 1, 2], name="trio")
    if world.rank == 3:
        out = {"group": group, "returned_in": time.monotonic() - start}
        time.sleep(sleep)
        return out
    comm = communicator.create(group)
    x = torch.ones(4) * (world.rank + 1)
    comm.all_reduce(x)
    group.barrier()
    return {"group": group.ranks, "sum": x[0].item(), "done_in": time.monotonic() - start}


def split_and_nest():
    """split by parity, key reversing the order; then groups of groups."""
    ctx = distrib.init()
    world = ctx.coordinator
    parity = world.split(world.rank % 2, key=-world.rank, name="parity")
    skip = world.split(None if world.rank == 7 else 0)
    sub = parity.group([1, 2], name="middle")  # ranks of parity: global ranks depend on parity
    out = {"parity": (parity.rank, parity.ranks, parity.describe()), "skip": skip is None or skip.ranks}
    if sub is not None:
        comm = communicator.create(sub)
        x = torch.tensor([float(world.rank)])
        comm.all_reduce(x)
        nested = sub.group([1])
        out["sub"] = (sub.rank, sub.ranks, x.item(), sub.all_gather(b"%d" % world.rank),
                      sub.describe(), nested and nested.ranks)
    world.barrier()
    return out


def late_replica(tp, delay, calls):
    """DP replicas make their TP group and communicator; replica 1 starts ``delay`` s late."""
    ctx = distrib.init()
    world = ctx.coordinator
    replica = world.rank // tp
    ctx.coordinator.barrier()  # a common start
    start = time.time()
    if replica == 1:
        time.sleep(delay)
    began = time.time()
    tp_group = world.group(list(range(replica * tp, replica * tp + tp)), name="tp")
    comm = communicator.create(tp_group)
    for i in range(calls):
        x = torch.full((16,), float(world.rank + i))
        comm.all_reduce(x)
        assert x[0].item() == sum(r + i for r in tp_group.ranks), x
    done = time.time()
    world.barrier()
    return {"replica": replica, "start": start, "began": began, "done": done}


def never_arrives(missing, timeout):
    """Ranks 1 and 3 make a group; rank ``missing`` never does."""
    ctx = distrib.init()
    world = ctx.coordinator
    if world.rank == missing:
        time.sleep(timeout + 4)
        return None
    if world.rank not in (1, 3):
        return None
    start = time.monotonic()
    try:
        world.group([1, 3], name="pair", timeout=timeout)
    except distrib.DistribTimeoutError as exc:
        return {"missing": exc.missing, "message": str(exc), "after": time.monotonic() - start}
    return {"error": "no timeout"}


def communicator_never_arrives(timeout):
    """A group of ranks 0 and 2 whose rank 2 never creates the group's communicator."""
    ctx = distrib.init()
    world = ctx.coordinator
    group = world.group([0, 2], name="pair", timeout=timeout)
    if group is None:
        return None
    if world.rank == 2:
        time.sleep(timeout + 4)
        return None
    start = time.monotonic()
    try:
        communicator.create(group)
    except distrib.DistribTimeoutError as exc:
        return {"missing": exc.missing, "message": str(exc), "after": time.monotonic() - start}
    return {"error": "no timeout"}


def pipeline_send_recv():
    """TP=2 x PP=2: stage 0 sends tensors and a tensor dict to stage 1, which answers back."""
    ctx = distrib.init()
    layout = distrib.parallel.layout(tp=2, pp=2)
    pp = communicator.create(layout.pp)
    rank = ctx.coordinator.rank
    cases = [(torch.float32, (3, 5)), (torch.bfloat16, (17,)), (torch.int64, (2, 2, 2)),
             (torch.float16, (0,)), (torch.uint8, (1000,)), (torch.float64, ())]
    received, dicts = [], None
    for i, (dtype, shape) in enumerate(cases):
        value = (torch.arange(max(1, torch.Size(shape).numel())) % 97 + rank * 10 + i)[:torch.Size(shape).numel()]
        if layout.is_first_stage:
            pp.send(value.to(dtype).reshape(shape), dst=1)
        else:
            buf = torch.empty(shape, dtype=dtype)
            pp.recv(buf, src=0)
            received.append(buf)
    if layout.is_first_stage:
        hidden = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
        pp.send_tensor_dict({"hidden": hidden, "residual": hidden.t(), "step": 7, "ids": [1, 2]}, dst=1)
        back = torch.empty(4, 6)
        pp.recv(back, src=1)
        return {"sent_hidden": hidden, "back": back}
    dicts = pp.recv_tensor_dict(src=0)
    pp.send(dicts["hidden"] * 2, dst=0)
    return {"received": received, "dict": dicts, "cases": cases}


def stage_never_sends(timeout):
    """PP=2 on 2 ranks: stage 1 waits for a tensor stage 0 never sends."""
    distrib.init()
    layout = distrib.parallel.layout(tp=1, pp=2)
    pp = communicator.create(layout.pp, options={"gloo": {"timeout": timeout}})
    if layout.is_first_stage:
        time.sleep(timeout + 4)
        return None
    start = time.monotonic()
    try:
        pp.recv(torch.empty(8), src=0)
    except distrib.DistribTimeoutError as exc:
        return {"missing": exc.missing, "message": str(exc), "after": time.monotonic() - start}
    return {"error": "no timeout"}


def conformance_on_group():
    from distrib.testing.conformance import run_conformance

    ctx = distrib.init()
    group = ctx.coordinator.group([3, 1], name="odd")
    if group is None:
        return None
    report = run_conformance("gloo", coordinator=group)
    return report.passed, report.skipped


def dies_before_its_group(how):
    """Rank 3 dies (``how``: "exit" or "raise") while rank 1 waits for it in the start of their group."""
    import os

    ctx = distrib.init()
    world = ctx.coordinator
    if world.rank == 3:
        time.sleep(0.5)
        if how == "exit":
            os._exit(7)
        raise RuntimeError("rank 3 fails before its group")
    world.group([1, 3], name="pair")  # the default timeout: 300 s
    time.sleep(600)
