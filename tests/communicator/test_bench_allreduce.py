"""The all-reduce benchmark's CPU smoke mode, so that the GPU benchmark's machinery cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distrib.bench import _report
from distrib.bench.allreduce import DEFAULT_SIZES, parse_size


def test_smoke_run_writes_a_checked_record_and_a_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distrib.bench", "allreduce", "--smoke", "--out", str(tmp_path),
         "--sizes", "1K,4K", "--iters", "5", "--commit", "test-commit"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "allreduce.json").read_text())
    meta, results = summary["meta"], summary["results"]
    assert meta["commit"] == "test-commit" and meta["nprocs"] == 2 and meta["baseline"] == "torch:gloo"
    assert meta["environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    targets = {r["target"] for r in results}
    assert {"distrib:gloo", "distrib:dispatcher", "torch:gloo"} <= targets
    for r in results:
        assert r["error"] is None and r["correct"] is True, r
        assert r["size"] in (1024, 4096) and r["iterations"] == 5
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
    assert all(r["ratio_to_baseline"] == pytest.approx(1.0) for r in results if r["target"] == "torch:gloo")
    table = (tmp_path / "allreduce.md").read_text()
    assert "## Eager, bfloat16" in table and "| 4 KiB |" in table and "`distrib:gloo`" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "allreduce.png").exists()
    else:
        assert (tmp_path / "allreduce.png").read_bytes()[:4] == b"\x89PNG"


def test_sizes_and_statistics():
    assert [parse_size(s) for s in ("4096", "64K", "1M", "1MiB", "256M")] == \
        [4096, 65536, 1 << 20, 1 << 20, 256 << 20]
    assert DEFAULT_SIZES[0] == 1024 and DEFAULT_SIZES[-1] == 256 << 20
    assert {64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20} <= set(DEFAULT_SIZES)  # DESIGN.md's sizes
    assert _report.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert _report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 10) == pytest.approx(1.4)
    assert _report.size_text(256 << 20) == "256 MiB" and _report.size_text(1536) == "1536 B"


def test_the_benchmark_entry_point_lists_benchmarks():
    result = subprocess.run([sys.executable, "-m", "distrib.bench"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "allreduce" in result.stderr


def test_a_size_a_communicator_declines_is_reported_as_declined_not_as_a_failure():
    def case(target, declined=None):
        timed = declined is None
        return {"target": target, "mode": "graph", "dtype": "bfloat16", "size": 1 << 26, "numel": 1 << 25,
                "times_us": [10.0, 11.0] if timed else [], "host_us": 1.0 if timed else None,
                "correct": True if timed else None, "error": None, "declined": declined}

    cases = [case("torch:nccl"), case("distrib:custom", "67108864 bytes exceed the registered buffer")]
    summary = _report.summarize([{"cases": cases}, {"cases": cases}], {})
    custom = next(r for r in summary["results"] if r["target"] == "distrib:custom")
    assert custom["declined"] and custom["correct"] is None and custom["error"] is None
    assert _report._cell(custom) == "declined"
    assert _report._cell(summary["results"][0]).startswith("10.")
