"""The custom P2P all-reduce on real GPUs (``pytest -m gpu``; skipped without 2+ GPUs).

Every test launches one process per GPU with distrib.launch and checks exact
results on integer-valued data (exact in every supported dtype), bitwise
equality across ranks, the fallbacks to NCCL, CUDA-graph capture, and that a
peer that never arrives is named instead of hanging.
"""
from __future__ import annotations

import hashlib
import random

import pytest

import distrib

pytestmark = pytest.mark.gpu

ALGORITHMS = ("lamport_one_shot", "one_shot", "two_shot")
DTYPES = ("float32", "float16", "bfloat16")


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def world_sizes():
    return [n for n in (2, 4, 8) if n <= _gpus()] or [2]


def _launch(fn, nprocs, *args):
    if _gpus() < nprocs:
        pytest.skip(f"needs {nprocs} GPUs")
    return distrib.launch(fn, nprocs=nprocs, args=args, timeout=900)


def _comm(order=("custom", "nccl"), **custom):
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


def _exact_sizes_worker(algorithm, limit):
    import torch

    ctx, comm = _comm(order=("custom",), algorithm=algorithm, max_bytes=limit)
    custom = comm["custom"]
    rank, world = ctx.info.rank, ctx.info.world_size
    failures, digests = [], []
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
                failures.append((dtype_name, nbytes))
            digests.append(hashlib.sha256(out.view(torch.uint8).cpu().numpy().tobytes()).hexdigest())
    custom.check()
    comm.close()
    return failures, hashlib.sha256("".join(digests).encode()).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("world", world_sizes())
def test_exact_for_every_size_dtype_and_algorithm(world, algorithm):
    limit = (1 << 20) if algorithm == "lamport_one_shot" else (8 << 20)
    results = _launch(_exact_sizes_worker, world, algorithm, limit)
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


@pytest.mark.parametrize("world", world_sizes())
def test_random_floats_give_bitwise_identical_results_on_every_rank(world):
    results = _launch(_random_floats_bitwise_worker, world)
    assert all(r == results[0] for r in results)


# -- stress -------------------------------------------------------------------------------

POOL = 16


def _stress_setup(world, seed):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)  # same pool on every rank
    pool = [torch.randint(-4, 4, ((1 << 20),), generator=g, device="cuda").float() for _ in range(POOL)]
    return pool


def _stress_eager_worker(calls, delays):
    import torch

    ctx, comm = _comm()
    rank, world = ctx.info.rank, ctx.info.world_size
    pool = _stress_setup(world, 7)
    total = world * (world + 1) // 2
    rng = random.Random(11)                  # the same call sequence on every rank
    delay_rng = random.Random(1000 + rank)   # different delays on every rank
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    limit = comm["custom"].max_bytes
    used = {"custom": 0}
    for i in range(calls):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[rng.randrange(3)]
        item = dtype.itemsize
        nbytes = 16 * rng.randint(1, (64 << 10) // 16 if rng.random() < 0.9 else min(limit, 4 << 20) // 16)
        n, off, k = nbytes // item, rng.randrange(0, 1024) * 8, rng.randrange(POOL)
        base = pool[k][off:off + n]
        x = (base * (rank + 1)).to(dtype)
        if delays and delay_rng.random() < 0.05:
            torch.cuda._sleep(delay_rng.randrange(1000, 200_000))  # the GPU starts this call late
        if rng.random() < 0.5:
            comm.all_reduce(x)
            out = x
        else:
            out = torch.empty_like(x)
            comm.all_reduce(x, out=out)
        mismatches += (out != (base * total).to(dtype)).sum()
        used["custom"] += 1
    torch.cuda.synchronize()
    comm["custom"].check()
    comm.close()
    return int(mismatches.item()), used


@pytest.mark.parametrize("world", world_sizes())
def test_stress_100k_eager_calls_with_random_sizes_data_and_delays(world):
    results = _launch(_stress_eager_worker, world, 100_000, True)
    for rank, (mismatches, _) in enumerate(results):
        assert mismatches == 0, f"rank {rank}: {mismatches} wrong elements"


def _stress_graph_worker(replays):
    """A graph of 50 all-reduces of random sizes interleaved with other kernels,
    replayed ``replays`` times (50 * replays all-reduces), then eager calls again."""
    import torch

    ctx, comm = _comm()
    custom = comm["custom"]
    rank, world = ctx.info.rank, ctx.info.world_size
    pool = _stress_setup(world, 3)
    total = world * (world + 1) // 2
    rng = random.Random(5)
    plan = []
    for i in range(50):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        nbytes = 16 * rng.randint(1, (512 << 10) // 16)
        plan.append((dtype, nbytes // dtype.itemsize, rng.randrange(POOL), rng.random() < 0.5))
    inputs = [torch.empty(n, dtype=d, device="cuda") for d, n, _, _ in plan]
    outputs = [torch.empty_like(t) for t in inputs]
    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    scale = torch.ones((), device="cuda")
    graph = torch.cuda.CUDAGraph()

    def body():
        for (dtype, n, k, out_of_place), x, o in zip(plan, inputs, outputs):
            x.copy_((pool[k][:n] * (rank + 1) * scale).to(dtype))       # another kernel before
            if out_of_place:
                comm.all_reduce(x, out=o)
                result = o
            else:
                comm.all_reduce(x)
                result = x
            mismatches.add_((result != (pool[k][:n] * total).to(dtype)).sum())  # and after

    with custom.capture():
        body()                       # warm-up inside capture(): eager, must be right too
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            body()
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    warm = int(mismatches.item())
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    replayed = int(mismatches.item()) - warm
    # The same communicator works eagerly again after capture and replay.
    x = torch.full((4096,), float(rank + 1), device="cuda")
    comm.all_reduce(x)
    eager_ok = bool(torch.all(x == total))
    custom.check()
    comm.close()
    return warm, replayed, eager_ok


@pytest.mark.parametrize("world", world_sizes())
def test_graph_capture_interleaved_with_kernels_replayed_2000_times_then_eager(world):
    results = _launch(_stress_graph_worker, world, 2000)
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


def test_tensors_the_kernel_cannot_take_go_to_nccl_and_are_right():
    chosen, correct, declined = _launch(_fallback_worker, 2)[0]
    assert declined is not None and "contiguous" in declined
    assert chosen["fits"] == "custom"
    for name in ("oversize", "misaligned", "int32", "float64_via_max"):
        assert chosen[name] == "nccl", (name, chosen[name])
    assert all(correct.values()), correct


def _missing_peer_worker():
    import torch

    ctx, comm = _comm(order=("custom",), timeout=2.0)
    x = torch.ones(1024, device="cuda")
    comm.all_reduce(x)
    torch.cuda.synchronize()
    ctx.coordinator.barrier()
    message = None
    if ctx.info.rank == 0:           # rank 1 never calls this one
        comm.all_reduce(x)
        torch.cuda.synchronize()     # returns: the kernel gives up after 2 s
        try:
            comm["custom"].check()
        except distrib.CommunicatorError as exc:
            message = str(exc)
    ctx.coordinator.barrier()
    return message


def test_a_peer_that_never_arrives_is_named_instead_of_hanging():
    message = _launch(_missing_peer_worker, 2)[0]
    assert message is not None and "waiting for rank 1" in message


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
