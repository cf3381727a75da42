"""The custom all-reduce is fail-stop (``pytest -m gpu``; world sizes 2, 4 and 8, on shared GPUs
where there are fewer): a late peer, a dying peer, counters across their wrap, mismatched
limits, two streams, a replay before registration. No call ever returns a wrong sum.

``python -m distrib.bench failstop`` repeats these scenarios (20 times each) and times the
abort path; this file runs each a few times.
"""
from __future__ import annotations

import json
import time

import pytest

import distrib
from distrib.testing.failstop import (ALGORITHMS, counters_across_the_wrap, dies_mid_call, late_peer,
                              late_peer_rounds, mismatched_limits, replay_before_registration,
                              stalls_mid_call, two_streams)
from distrib.testing.placement import placement

WORLD_SIZES = (2, 4, 8)

pytestmark = pytest.mark.gpu


def _launch(fn, nprocs, *args, timeout=600, **kwargs):
    return distrib.launch(fn, nprocs=nprocs, args=args, kwargs=kwargs, timeout=timeout,
                          start_method="forkserver", **placement(nprocs))


def _no_wrong_sums_and_everyone_stopped(outcomes: list[str], where: str) -> None:
    calls = [o for o in outcomes if not o.startswith("check: ")]
    assert "wrong" not in calls, (where, outcomes)
    # Before the stall every call is exact; from it on, the communicator is stopped everywhere.
    assert calls[:3] == ["exact"] * 3, (where, outcomes)
    assert calls[-1] in ("nan", "raised"), (where, outcomes)
    assert any(o.startswith("check: ") for o in outcomes), (where, outcomes)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_late_peer_never_yields_a_wrong_sum_eager_or_graph_every_algorithm(world):
    results = _launch(late_peer_rounds, world, 2, world - 1)
    for rank, scenarios in enumerate(results):
        assert set(scenarios) == {f"{m}/{a}" for m in ("eager", "graph") for a in ALGORITHMS}
        for name, runs in scenarios.items():
            for outcomes in runs:
                _no_wrong_sums_and_everyone_stopped(outcomes, f"rank {rank}, {name}")
    # Every rank's error names the late rank: the ones that waited for it, and the ones
    # stopped by a rank that did.
    for rank, scenarios in enumerate(results):
        for name, runs in scenarios.items():
            check = [o for o in runs[0] if o.startswith("check: ")][0]
            assert f"waiting for rank {world - 1}" in check, (rank, name, check)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_by_default_a_late_peer_ends_the_launch_with_its_report(world, tmp_path):
    log = tmp_path / "outcomes.jsonl"
    started = time.time()
    with pytest.raises(distrib.WorkerFailedError) as info:
        _launch(late_peer, world, "graph", "one_shot", world - 1, stall=30.0, calls=8,
                log=str(log), on_error="abort", timeout=300)
    elapsed = time.time() - started
    message = str(info.value)
    assert "custom all-reduce" in message and f"waiting for rank {world - 1}" in message, message
    assert elapsed < 30.0, f"the launch ended after {elapsed:.1f}s; the stalled rank sleeps 30s"
    outcomes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert all(result != "wrong" for _, _, result, _ in outcomes), outcomes


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_peer_stalled_between_its_barriers_never_keeps_a_torn_sum(world):
    for algorithm in ("one_shot", "two_shot"):
        results = _launch(stalls_mid_call, world, algorithm, world - 1)
        for rank, outcomes in enumerate(results):
            assert "wrong" not in outcomes, (algorithm, rank, outcomes)
            assert outcomes[:3] == ["exact"] * 3, (algorithm, rank, outcomes)
        # The peers gave up on it, so its stalled call cannot be whole.
        assert results[world - 1][3] == "nan", (algorithm, results)


def test_without_fail_stop_that_stall_does_tear_the_sum():
    """The scenario above reaches the torn read: only the last barrier's poison check saves it."""
    results = _launch(stalls_mid_call, 2, "one_shot", 1, fail_stop=False)
    assert results[1][3] == "wrong", results


def test_a_peer_that_dies_mid_call_ends_the_launch_naming_it(tmp_path):
    log = tmp_path / "outcomes.jsonl"
    with pytest.raises(distrib.WorkerFailedError) as info:
        _launch(dies_mid_call, 4, 2, str(log), timeout=300)
    assert "rank 2" in str(info.value) and "SIGKILL" in str(info.value), str(info.value)
    outcomes = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(result != "wrong" for _, _, result, _ in outcomes), outcomes


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_counters_across_their_wrap_stay_exact(world):
    calls = 3000
    start = (1 << 32) - calls // 4
    for rank, (wrong, after) in enumerate(_launch(counters_across_the_wrap, world, calls)):
        assert wrong == 0, (rank, wrong)
        # Block 0 runs in every call: its counters went past 2^32 and wrapped.
        assert after["one_shot"][0] < start and after["two_shot"][0] < start, after
        assert after["lamport_one_shot"][1] < start, after


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_calls_on_two_streams_are_ordered(world):
    assert _launch(two_streams, world, 2000) == [0] * world


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_replay_before_registration_is_refused_not_an_illegal_address(world):
    for rank, report in enumerate(_launch(replay_before_registration, world)):
        assert report["early"] == "nan", (rank, report)
        assert report["early_check"] and "before its captured all-reduces were registered" in \
            report["early_check"], (rank, report)
        assert report["register"] and "different numbers" in report["register"], (rank, report)
        assert report["after_failed_registration"] == "nan", (rank, report)
        assert report["late_check"] is not None, (rank, report)


def test_mismatched_limits_are_refused_on_every_rank():
    for rank, message in enumerate(_launch(mismatched_limits, 2)):
        assert message is not None and "max_bytes" in message and "rank 1 = 2097152" in message, (rank, message)
