"""The operator-overhead benchmark, tiny, so that its machinery cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distrib.bench import op_overhead


def test_a_tiny_run_checks_every_path_and_writes_a_record_and_a_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distrib.bench", "op-overhead", "--nprocs", "2", "--calls", "20",
         "--repeats", "5", "--warmup", "2", "--out", str(tmp_path), "--commit", "test-commit"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "op-overhead.cpu.np2.json").read_text())
    meta, paths = summary["meta"], summary["result"]["paths"]
    assert meta["commit"] == "test-commit" and meta["nprocs"] == 2 and meta["member"] == "gloo"
    assert set(paths) == {"direct", "operator", "kernel"}
    for record in paths.values():
        assert record["correct"]  # each path really reduced before it was timed
        assert len(record["samples_us"]) == 5 and 0 < record["min_us"] <= record["median_us"] <= record["max_us"]
    assert summary["result"]["operator_over_direct"] == pytest.approx(
        paths["operator"]["median_us"] / paths["direct"]["median_us"])
    table = (tmp_path / "op-overhead.cpu.np2.md").read_text()
    assert "| `operator` |" in table and "operator / direct = **" in table and table in result.stdout


def test_the_verdict_follows_the_limit():
    def rank(direct, operator):
        return {"samples_us": {"direct": direct, "operator": operator},
                "correct": {"direct": True, "operator": True}}

    # Per sample the slowest rank counts: direct 10, 11, 12 -> median 11; operator 14, 15, 16 -> 15.
    per_rank = [rank([10, 9, 12], [14, 15, 13]), rank([8, 11, 11], [13, 12, 16])]
    within = op_overhead.summarize(per_rank, limit=1.4)
    assert within["paths"]["direct"]["median_us"] == 11 and within["paths"]["operator"]["median_us"] == 15
    assert within["operator_over_direct"] == pytest.approx(15 / 11) and within["passed"]
    assert not op_overhead.summarize(per_rank, limit=1.3)["passed"]
    # Adjacent samples: 14/10, 15/11, 16/12 -> the median is 15/11.
    assert within["paired_ratio_median"] == pytest.approx(15 / 11)
