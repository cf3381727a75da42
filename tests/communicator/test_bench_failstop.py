"""``python -m distrib.bench failstop``'s bookkeeping, on CPU: how outcomes are counted and shown."""
from __future__ import annotations

import json

from distrib.bench import failstop


def _rank(late: list, stalled: list) -> dict:
    return {"late_peer": {"eager/one_shot": [late]},
            "stall_mid_call": {"one_shot": [stalled]},
            "wrap": [0], "two_streams": [0],
            "replay_before_registration": [{"early": "nan", "after_failed_registration": "nan",
                                            "early_check": "refused", "register": "different numbers"}],
            "mismatched_limits": ["max_bytes: rank 1 = 2097152"]}


def test_a_wrong_sum_anywhere_is_counted_and_the_stalled_call_must_be_nan():
    check = "check: custom all-reduce on rank 0 gave up after 0.2s waiting for rank 1"
    ranks = [_rank(["exact", "nan", "raised", check], ["exact", "exact", "exact", "nan"]),
             _rank(["exact", "wrong", check], ["exact", "exact", "exact", "wrong"])]
    rows = failstop._tally(ranks, world=2)
    late = rows["late peer, eager/one_shot"]
    assert late["wrong"] == 1 and late["errors naming the late rank"] == 2
    assert late["outcomes"] == {"exact": 2, "nan": 1, "raised": 1, "wrong": 1, "check": 2}
    stalled = rows["peer stalled between barriers, eager/one_shot"]
    assert stalled["wrong"] == 1 and stalled["stalled call NaN"] == 0  # the last rank's call 3
    assert rows["mismatched limits"]["refused on every rank"] == 2


def test_the_table_shows_every_scenario_and_the_cost_ratios():
    ranks = [_rank(["exact"], ["exact", "exact", "exact", "nan"])] * 2
    record = {"meta": {"world_size": 2, "gpus": 1, "gpu": "GPU", "placement": {},
                       "parts": {"scenarios": {"commit": "abc", "date": "today", "reps": 1},
                                 "cost": {"commit": "def", "date": "later", "rounds": 5}}},
              "scenarios": failstop._tally(ranks, world=2),
              "cost": [{"algorithm": "one_shot", "bytes": 1024, "mode": "graph",
                        "slowest_rank_fail_stop_us": 5.1, "slowest_rank_without_us": 5.0,
                        "median_round_ratio_per_rank": [1.01, 1.03]}]}
    table = failstop._markdown(record)
    assert "| peer stalled between barriers, eager/one_shot | 1 | 0 |" in table
    assert "| one_shot | 1024 | graph | 5.10 | 5.00 | 1.020 | 1.010, 1.030 |" in table
    assert "- scenarios: commit abc, today, reps 1" in table and "- cost: commit def, later, rounds 5" in table


def test_parts_run_separately_are_kept_only_for_the_same_world_and_gpu(tmp_path):
    path = tmp_path / "failstop-4ranks.json"
    assert failstop._kept(str(path), 4, "GPU") == {"meta": {"parts": {}}}  # nothing there yet
    earlier = {"meta": {"world_size": 4, "gpu": "GPU", "parts": {"cost": {"commit": "abc", "date": "d"}}},
               "cost": [{"algorithm": "one_shot"}]}
    path.write_text(json.dumps(earlier))
    assert failstop._kept(str(path), 4, "GPU") == earlier
    assert failstop._kept(str(path), 8, "GPU") == {"meta": {"parts": {}}}
    assert failstop._kept(str(path), 4, "other GPU") == {"meta": {"parts": {}}}
    path.write_text(json.dumps({"meta": {"world_size": 4, "gpu": "GPU"}}))  # written before parts had provenance
    assert failstop._kept(str(path), 4, "GPU") == {"meta": {"parts": {}}}
