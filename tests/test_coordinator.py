"""The gloo Coordinator, on real processes."""
import time

import pytest

import distrib
import workers
from distrib.coordinator import Coordinator, GlooCoordinator, coordinators

FAST = dict(start_method="forkserver", timeout=180)


def test_operations_on_four_ranks_including_empty_and_multi_megabyte_payloads():
    big = 3 * 1024 * 1024
    results = distrib.launch(workers.coordinator_ops, nprocs=4, args=(big,), **FAST)
    for rank, out in enumerate(results):
        assert out["default_group_initialized"] is False  # the user's default group is untouched
        assert out["is_master"] == (rank == 0) and out["is_local_master"] == (rank == 0)
        assert out["bcast"] == b"hello"
        assert out["bcast_src_last"] == bytes([3]) * 3
        assert out["empty_bcast"] == b""
        assert out["gather"] == [b"", b"1", b"22", b"333"]
        assert out["empty_gather"] == [b""] * 4
        assert out["big_ok"] and out["big_gather_ok"]


def test_barrier_timeout_names_the_rank_that_never_arrived():
    start = time.monotonic()
    results = distrib.launch(workers.op_with_missing, nprocs=4, args=("barrier", 2, 3.0), **FAST)
    for rank, out in enumerate(results):
        if rank == 2:
            continue
        kind, missing, message = out
        assert kind == "timeout" and tuple(missing) == (2,)
        assert "rank 2 never arrived" in message and "arrived: 0-1, 3" in message
    assert time.monotonic() - start < 60


def test_collective_timeout_names_the_rank_that_is_behind():
    results = distrib.launch(workers.op_with_missing, nprocs=3, args=("all_gather", 1, 3.0), **FAST)
    for rank in (0, 2):
        kind, missing, message = results[rank]
        assert kind == "timeout", message
        assert tuple(missing) == (1,) and "rank 1 never arrived" in message


def test_users_env_default_group_works_alongside_the_coordinator():
    results = distrib.launch(workers.user_default_group_alongside, nprocs=2, **FAST)
    assert results == [(3.0, b"still fine"), (3.0, b"still fine")]


def test_closed_coordinator_raises_a_clear_error():
    (message,) = distrib.launch(workers.closed_coordinator_use, nprocs=1, **FAST)
    assert message is not None and "closed" in message


def test_registry_lists_gloo_and_rejects_unknown_names():
    assert coordinators.get("gloo") is GlooCoordinator
    assert issubclass(GlooCoordinator, Coordinator)
    with pytest.raises(distrib.ConfigError, match="unknown coordinator 'nope'; known: gloo"):
        coordinators.get("nope")
    with pytest.raises(distrib.ConfigError, match="already registered"):
        coordinators.register("gloo", object)


def test_coordinator_is_abstract():
    with pytest.raises(TypeError):
        Coordinator(None)  # type: ignore[abstract]
