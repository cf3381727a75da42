"""The channel benchmark, tiny, so that its machinery cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys


def test_a_tiny_run_writes_a_record_and_a_table_with_every_target(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distrib.bench", "channel", "--nprocs", "3", "--out", str(tmp_path),
         "--iters", "5", "--iters-large", "2", "--warmup", "1", "--idle-ms", "12", "--idle-iters", "2",
         "--zmq", "--commit", "test-commit"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "channel.np3.json").read_text())
    meta, results = summary["meta"], summary["results"]
    assert meta["commit"] == "test-commit" and meta["nprocs"] == 3 and meta["cpu_count"] >= 1
    assert {(r["target"], r["size"], r["mode"]) for r in results} == {
        (t, s, m) for t in ("channel", "channel-zmq", "gloo") for s, m in ((1024, "hot"), (1 << 20, "hot"))
    } | {(t, 1024, "idle") for t in ("channel", "channel-zmq", "gloo")}
    for r in results:
        assert r["samples"] == 2 * r["iters"]  # two readers
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]
    table = (tmp_path / "channel.np3.md").read_text()
    assert "| 1 KiB | hot (1 ms) | `channel` |" in table and "| 1 MiB |" in table
    assert table in result.stdout
