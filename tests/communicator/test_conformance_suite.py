"""The conformance suite catches communicators that break the contract."""
from __future__ import annotations

import pytest

from communicator_support import BroadcastDoesNothing, GathersInReverse, IgnoresOut, MaxIsSum
from distrib.errors import WorkerFailedError
from distrib.testing import launch_conformance


@pytest.mark.parametrize("broken, check", [
    (MaxIsSum, "[all_reduce] broken_max"),
    (IgnoresOut, "[all_reduce_out] broken_out"),
    (GathersInReverse, "[all_gather] broken_gather"),
    (BroadcastDoesNothing, "[broadcast] broken_broadcast"),
])
def test_a_broken_communicator_fails_the_suite(broken, check):
    with pytest.raises(WorkerFailedError) as failure:
        launch_conformance(broken, 2, start_method="forkserver", timeout=120)
    message = str(failure.value)
    assert "ConformanceError" in message and check in message


def test_tensors_a_communicator_declines_are_reported_not_failed():
    from communicator_support import EvenOnly

    report = launch_conformance(EvenOnly, 2, start_method="forkserver", timeout=120)[0]
    assert "all_reduce" in report.passed and not report.skipped
    assert report.declined and all("takes even sizes only" in d for d in report.declined)
    assert any("float32[7]" in d for d in report.declined)


def test_the_suite_reports_what_it_skipped():
    # A rank of one cannot disagree with itself.
    report = launch_conformance("gloo", 1, start_method="forkserver", timeout=120)[0]
    assert ("debug_mode", "mismatches across ranks need at least 2 ranks") in report.skipped
