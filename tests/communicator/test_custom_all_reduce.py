"""The custom P2P all-reduce on real GPUs (``pytest -m gpu``).

Every test runs at world sizes 2, 4 and 8: one process per GPU where the
machine has that many GPUs, otherwise with ranks sharing the GPUs
(``share_gpu``), so that every code path runs on a one-GPU machine too. They
check exact results on integer-valued data (exact in every supported
dtype), bitwise equality across ranks, the fallbacks, CUDA-graph capture, the
conformance suite, and that a peer that never arrives is named instead of
hanging.
"""
from __future__ import annotations

import functools
import hashlib
import random

import pytest

import distrib
from distrib.testing.placement import placement, shares_gpus

pytestmark = pytest.mark.gpu

ALGORITHMS = ("lamport_one_shot", "one_shot", "two_shot")
DTYPES = ("float32", "float16", "bfloat16")
WORLD_SIZES = (2, 4, 8)


def _launch(fn, nprocs, *args, timeout=900):
    return distrib.launch(fn, nprocs=nprocs, args=args, timeout=timeout, start_method="forkserver",
                          **placement(nprocs))


def _comm(order=("custom", "nccl", "gloo"), **custom):
    from distrib.communicator import create

    ctx = distrib.init()
    return ctx, create(ctx.coordinator, ctx.device, order=list(order), options={"custom": custom})


# -- exactness over sizes -------------------------------------------------------------

def _sizes(limit: int) -> list[int]:
    """16..4096 bytes densely, then odd multiples of 16 at growing steps, then the limit."""
    sizes = list(range(16, 4097, 16))
    s = 4096
    while s < limit:
        sizes += [s - 16, s, s + 16, s * 3 // 2 + 16]  # s / 16 is even: s +- 16 are odd multiples
        s *= 2
    sizes.append(limit)
    return sorted(set(x for x in sizes if 0 < x <= limit))


def _exact_sizes_worker():
    import torch

    ctx = distrib.init()
    rank, world = ctx.info.rank, ctx.info.world_size
    failures, digests = [], []
    for algorithm in ALGORITHMS:
        limit = (1 << 20) if algorithm == "lamport_one_shot" else (8 << 20)
        _, comm = _comm(order=("custom",), algorithm=algorithm, max_bytes=limit)
        custom = comm["custom"]
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for nbytes in _sizes(limit):
                n = nbytes // dtype.itemsize
                base = (torch.arange(n, device="cuda") % 17 - 8)
                x = (base * (rank + 1)).to(dtype)
                expected = (base * (world * (world + 1) // 2)).to(dtype)
                out = torch.empty_like(x)
                assert custom.can_all_reduce(x) is None
                comm.all_reduce(x, out=out)                   # out of place
                y = x.clone()
                comm.all_reduce(y)                            # in place
                if not (torch.equal(out, expected) and torch.equal(y, expected)):
                    failures.append((algorithm, dtype_name, nbytes))
                digests.append(hashlib.sha256(out.view(torch.uint8).cpu().numpy().tobytes()).hexdigest())
        custom.check()
        comm.close()
    return failures, hashlib.sha256("".join(digests).encode()).hexdigest()


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_exact_for_every_size_dtype_and_algorithm(world):
    results = _launch(_exact_sizes_worker, world)
    for rank, (failures, _) in enumerate(results):
        assert failures == [], f"rank {rank}: wrong results for {failures[:10]}"
    assert len({digest for _, digest in results}) == 1  # bitwise the same on every rank


def _random_floats_bitwise_worker():
    import torch

    ctx, comm = _comm()
    g = torch.Generator(device="cuda").manual_seed(100 + ctx.info.rank)
    digests = []
    for nbytes in (1024, 64 << 10, 1 << 20, 4 << 20):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(nbytes // dtype.itemsize, generator=g, device="cuda").to(dtype)
            comm.all_reduce(x)
            digests.append(hashlib.sha256(x.view(torch.uint8).cpu().numpy().tobytes()).hexdigest())
    comm.close()
    return digests


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_random_floats_give_bitwise_identical_results_on_every_rank(world):
    results = _launch(_random_floats_bitwise_worker, world)
    assert all(r == results[0] for r in results)


# -- stress -------------------------------------------------------------------------------

POOL = 16
POOL_ELEMENTS = (2 << 20) + 8192  # 4 MiB of bf16 at any offset < 8192
BITS = {"float32": "int32", "float16": "int16", "bfloat16": "int16"}


def _stress_setup(seed):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)  # same pool on every rank
    return [torch.randint(-4, 4, (POOL_ELEMENTS,), generator=g, device="cuda").float() for _ in range(POOL)]


def _members():
    """The dispatcher (custom chooses by its tables) and one custom communicator per algorithm."""
    from distrib.communicator import create

    ctx, comm = _comm()
    forced = [create(ctx.coordinator, ctx.device, order=["custom"],
                     options={"custom": {"algorithm": alg, "max_bytes": 4 << 20}}) for alg in ALGORITHMS]
    return ctx, comm, forced


def _mismatches(out, reference):
    import torch

    bits = getattr(torch, BITS[str(out.dtype).replace("torch.", "")])
    return (out.view(bits) != reference.view(bits)).sum()  # bit for bit


def _stress_eager_worker(calls, delays):
    """Random sizes, dtypes, algorithms and placement; bursts of up to 64 calls without a
    host sync; random GPU-side delays per rank; every result checked bit for bit."""
    import torch

    ctx, comm, forced = _members()
    members = [comm, *forced]
    rank, world = ctx.info.rank, ctx.info.world_size
    pool = _stress_setup(7)
    total = world * (world + 1) // 2
    rng = random.Random(11)                  # the same call sequence on every rank
    delay_rng = random.Random(1000 + rank)   # different delays on every rank
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    used: dict = {}
    done = 0
    while done < calls:
        for _ in range(min(rng.randint(1, 64), calls - done)):
            which = rng.randrange(len(members))
            member = members[which]
            limit = comm["custom"].max_bytes if which == 0 else 4 << 20
            dtype = (torch.float32, torch.bfloat16, torch.float16)[rng.randrange(3)]
            nbytes = 16 * rng.randint(1, (64 << 10) // 16 if rng.random() < 0.8 else min(limit, 4 << 20) // 16)
            n, off, k = nbytes // dtype.itemsize, rng.randrange(0, 1024) * 8, rng.randrange(POOL)
            base = pool[k][off:off + n]
            x = (base * (rank + 1)).to(dtype)
            if delays and delay_rng.random() < 0.05:
                torch.cuda._sleep(delay_rng.randrange(1000, 200_000))  # the GPU starts this call late
            if rng.random() < 0.5:
                member.all_reduce(x)
                out = x
            else:
                out = torch.empty_like(x)
                member.all_reduce(x, out=out)
            mismatches += _mismatches(out, (base * total).to(dtype))
            algorithm = ALGORITHMS[which - 1] if which else comm["custom"]._engine.algorithm(nbytes)
            used[algorithm] = used.get(algorithm, 0) + 1
            done += 1
        if rng.random() < 0.5:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    for member in members:
        member["custom"].check()
        member.close()
    return int(mismatches.item()), used


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_stress_eager_calls_with_random_sizes_algorithms_bursts_and_delays(world):
    calls = 12_000 if shares_gpus(world) else 100_000
    results = _launch(_stress_eager_worker, world, calls, True)
    for rank, (mismatches, used) in enumerate(results):
        assert mismatches == 0, f"rank {rank}: {mismatches} wrong elements"
        assert sum(used.values()) == calls and all(used.get(a, 0) >= calls // 10 for a in ALGORITHMS), used


def _stress_graph_worker(replays):
    """A graph of 50 all-reduces of random sizes and algorithms interleaved with other kernels,
    captured in capture() and replayed ``replays`` times with fresh inputs, then eager again."""
    import contextlib

    import torch

    ctx, comm, forced = _members()
    members = [comm, *forced]
    rank, world = ctx.info.rank, ctx.info.world_size
    pool = _stress_setup(3)
    total = world * (world + 1) // 2
    rng = random.Random(5)
    plan = []
    for i in range(50):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        nbytes = 16 * rng.randint(1, (512 << 10) // 16)
        plan.append((dtype, nbytes // dtype.itemsize, rng.randrange(POOL), rng.random() < 0.5,
                     rng.randrange(len(members))))
    inputs = [torch.empty(n, dtype=d, device="cuda") for d, n, _, _, _ in plan]
    outputs = [torch.empty_like(t) for t in inputs]
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    shift = torch.zeros((), device="cuda")  # fresh inputs on every replay
    graph = torch.cuda.CUDAGraph()

    def body():
        for (dtype, n, k, out_of_place, which), x, o in zip(plan, inputs, outputs):
            x.copy_(((pool[k][:n] + shift) * (rank + 1)).to(dtype))       # another kernel before
            if out_of_place:
                members[which].all_reduce(x, out=o)
                result = o
            else:
                members[which].all_reduce(x)
                result = x
            mismatches.add_(_mismatches(result, ((pool[k][:n] + shift) * total).to(dtype)))  # and after

    with contextlib.ExitStack() as stack:
        for member in members:
            stack.enter_context(member.capture())
        body()                       # warm-up inside capture(): eager, must be right too
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            body()
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    warm = int(mismatches.item())
    for replay in range(replays):
        shift.fill_(float(replay % 4))
        graph.replay()
    torch.cuda.synchronize()
    replayed = int(mismatches.item()) - warm
    # The same communicator works eagerly again after capture and replay.
    x = torch.full((4096,), float(rank + 1), device="cuda")
    comm.all_reduce(x)
    eager_ok = bool(torch.all(x == total))
    for member in members:
        member["custom"].check()
        member.close()
    return warm, replayed, eager_ok


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_graph_capture_interleaved_with_kernels_replayed_with_fresh_inputs_then_eager(world):
    results = _launch(_stress_graph_worker, world, 200 if shares_gpus(world) else 2000)
    for rank, (warm, replayed, eager_ok) in enumerate(results):
        assert warm == 0 and replayed == 0 and eager_ok, (rank, warm, replayed, eager_ok)


# -- fallbacks and failures -------------------------------------------------------------------

def _fallback_worker():
    import torch

    ctx, comm = _comm()
    rank, world = ctx.info.rank, ctx.info.world_size
    total = world * (world + 1) // 2
    limit = comm["custom"].max_bytes
    cases = {
        "fits": torch.full((4096,), float(rank + 1), device="cuda"),
        "oversize": torch.full((limit // 4 + 4,), float(rank + 1), device="cuda"),
        "misaligned": torch.full((1001,), float(rank + 1), device="cuda"),
        "non_contiguous": torch.full((64, 64), float(rank + 1), device="cuda").t(),
        "int32": torch.full((4096,), rank + 1, dtype=torch.int32, device="cuda"),
        "float64_via_max": torch.full((4096,), float(rank + 1), dtype=torch.float64, device="cuda"),
    }
    chosen, correct = {}, {}
    declined = comm["custom"].can_all_reduce(cases.pop("non_contiguous"))
    for name, x in cases.items():
        op = "max" if name == "float64_via_max" else "sum"
        member = comm.communicator_for(x, op)
        chosen[name] = member.name if member is not None else None
        comm.all_reduce(x, op)
        want = world if op == "max" else total
        correct[name] = bool(torch.all(x == want))
    comm.close()
    return chosen, correct, declined


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_tensors_the_kernel_cannot_take_go_to_the_fallback_and_are_right(world):
    # NCCL refuses ranks that share a GPU: then gloo takes them, through host memory.
    fallback = "gloo" if shares_gpus(world) else "nccl"
    chosen, correct, declined = _launch(_fallback_worker, world)[0]
    assert declined is not None and "contiguous" in declined
    assert chosen["fits"] == "custom"
    for name in ("oversize", "misaligned", "int32", "float64_via_max"):
        assert chosen[name] == fallback, (name, chosen[name])
    assert all(correct.values()), correct


def _missing_peer_worker():
    import torch

    ctx, comm = _comm(order=("custom",), timeout=2.0, on_error="raise")
    x = torch.ones(1024, device="cuda")
    comm.all_reduce(x)
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    if ctx.info.rank == 0:           # no other rank calls this one
        comm.all_reduce(x)
        torch.cuda.synchronize()     # returns: the kernel gives up after 2 s
    ctx.coordinator.barrier()
    if ctx.info.rank != 0:           # the others' next call finds the communicator stopped
        comm.all_reduce(x)
        torch.cuda.synchronize()
    try:
        comm["custom"].check()
    except distrib.CommunicatorError as exc:
        message = str(exc)
    else:
        message = None
    nan = bool(torch.isnan(x).any())  # a call that gave up leaves NaN, never a plausible sum
    ctx.coordinator.barrier()
    return message, nan


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_peer_that_never_arrives_is_named_and_stops_every_rank(world):
    results = _launch(_missing_peer_worker, world)
    message, nan = results[0]
    assert message is not None and "gave up after 2s waiting for rank" in message, message
    assert "waiting for rank 0" not in message and nan
    for rank, (message, nan) in enumerate(results[1:], start=1):
        assert message is not None and "rank 0 had given up" in message, (rank, message)
        assert nan, rank


def _p2p_check_worker(cache_dir):
    import os

    os.environ["DISTRIB_CACHE_DIR"] = cache_dir
    ctx, comm = _comm(order=("custom",))
    ok = comm["custom"].max_bytes > 0
    comm.close()
    return ok, sorted(os.listdir(cache_dir))


def test_p2p_check_runs_and_is_cached_per_device_set(tmp_path):
    first = _launch(_p2p_check_worker, 2, str(tmp_path))
    assert first[0][0] and len(first[0][1]) == 1 and first[0][1][0].startswith("p2p-")
    second = _launch(_p2p_check_worker, 2, str(tmp_path))
    assert second[0] == first[0]


# -- the conformance suite ---------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("spec", ["custom", "dispatcher"])
def test_conformance_of_custom_and_the_dispatcher(world, spec):
    from distrib.communicator import create
    from distrib.testing import launch_conformance

    factory = "custom" if spec == "custom" else functools.partial(create, order=["custom", "ipc", "nccl", "gloo"])
    reports = launch_conformance(factory, world, graph=True, start_method="forkserver", timeout=600,
                                 **placement(world))
    for report in reports:
        assert {"all_reduce", "all_reduce_out", "cuda_graph", "caller_stream"} <= set(report.passed), report
        if spec == "dispatcher":  # send/recv through CUDA IPC, in graphs too
            assert {"send_recv", "send_recv_graph"} <= set(report.passed), report
