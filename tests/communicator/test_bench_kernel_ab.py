"""``python -m distrib.bench kernel-ab``'s bookkeeping, on CPU: the baseline's export and the table."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from distrib.bench import kernel_ab

REPO = Path(__file__).resolve().parents[2]


def _row(rank_scale: float, wrong: int = 0) -> dict:
    return {"bytes": 1024, "mode": "graph", "rounds": 3, "wrong": wrong,
            "median_us": {"base": 10.0 * rank_scale, "base without fail-stop": 9.0,
                          "head": 8.0, "head without fail-stop": 8.0 * rank_scale},
            "head / base": 0.8 * rank_scale, "head / base, without fail-stop": 0.9,
            "fail-stop / without, base": 1.1, "fail-stop / without, head": 1.0 * rank_scale}


def test_the_slowest_rank_and_every_rank_s_ratio_are_kept_and_shown():
    rows = kernel_ab._summary([[_row(1.0)], [_row(1.05, wrong=2)]])
    assert rows[0]["slowest_rank_us"]["base"] == 10.5 and rows[0]["wrong"] == 2
    assert rows[0]["ratios_per_rank"]["head / base"] == [0.8, 0.8 * 1.05]
    record = {"meta": {"algorithm": "lamport_one_shot", "gpu": "GPU", "gpus": 1, "head": "abc", "base": "def",
                       "date": "today", "command": "cmd", "placements": {2: {}}},
              "worlds": {2: rows}}
    table = kernel_ab._markdown(record)
    assert "| 1024 | graph | 10.50 | 8.00 | 9.00 | 8.40 | 0.800–0.840 | 1.100–1.100 | 1.000–1.050 | 2 |" in table


def test_the_baseline_kernels_come_from_git_and_a_bad_revision_is_a_clear_error(tmp_path, monkeypatch):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(REPO)
    short = kernel_ab._export("HEAD", tmp_path)
    assert short and (tmp_path / "custom_all_reduce.cuh").read_bytes() == subprocess.run(
        ["git", "show", "HEAD:kernels/custom_all_reduce.cuh"], capture_output=True, check=True).stdout
    with pytest.raises(SystemExit, match="cannot read kernels/ at 'no-such-revision'"):
        kernel_ab._export("no-such-revision", tmp_path)
