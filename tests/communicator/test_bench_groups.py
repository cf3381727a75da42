"""``python -m distrib.bench groups`` on CPU: the send/recv part through gloo (the GPU parts run on GPUs)."""
from __future__ import annotations

import json

from distrib.bench import groups


def test_the_sendrecv_part_times_gloo_and_checks_every_message(tmp_path):
    assert groups.main(["--parts", "sendrecv", "--sizes", "1024,65536", "--iters", "5", "--repeats", "3",
                        "--out", str(tmp_path), "--commit", "abc"]) == 0
    record = json.loads((tmp_path / "groups-sendrecv.json").read_text())
    rows = {(r["backend"], r["mode"], r["bytes"]): r for r in record["rows"]}
    assert set(rows) >= {("gloo", "eager", 1024), ("gloo", "eager", 65536)}
    for row in rows.values():
        assert row["wrong"] == 0 and 0 < row["min_us"] <= row["median_us"] <= row["max_us"]
    assert record["meta"]["commit"] == "abc" and record["meta"]["iters"] == 5
    table = (tmp_path / "groups-sendrecv.md").read_text()
    assert "| gloo | eager | 1 KiB |" in table and "| gloo | eager | 64 KiB |" in table


def test_the_allreduce_part_is_skipped_without_a_gpu(tmp_path, capsys):
    assert groups.main(["--parts", "allreduce", "--out", str(tmp_path)]) == 0
    assert "needs a GPU; skipped" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
