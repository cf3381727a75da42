"""The benches' variant-in-turns timing loop, on CPU with stand-ins for CUDA's graphs and events."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from distrib.bench import _alternate


class _Graph:
    """Records the all-reduces issued while capturing, and issues them again on replay."""
    capturing = None

    def __init__(self):
        self.calls = []

    def replay(self):
        for call in self.calls:
            call()


@contextlib.contextmanager
def _graph(graph):
    _Graph.capturing = graph
    try:
        yield
    finally:
        _Graph.capturing = None


class _Event:
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        _Event.clock += 1.0
        self.at = _Event.clock

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds
        return end.at - self.at


class _Comm:
    """Writes ``value`` into ``out``; a bad one writes something else from its ``bad_from``-th call on."""

    def __init__(self, value, bad_from=None):
        self.value, self.bad_from, self.calls, self.captures = value, bad_from, 0, 0

    @contextlib.contextmanager
    def capture(self):
        self.captures += 1
        yield

    def all_reduce(self, x, out):
        def run():
            self.calls += 1
            wrong = self.bad_from is not None and self.calls >= self.bad_from
            out.fill_(self.value + (1.0 if wrong else 0.0))
        if _Graph.capturing is not None:
            _Graph.capturing.calls.append(run)
        else:
            run()


def test_every_variant_is_timed_each_round_and_wrong_results_are_counted_per_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    barriers = []
    ctx = SimpleNamespace(coordinator=SimpleNamespace(barrier=lambda: barriers.append(1)))
    good, bad = _Comm(3.0), _Comm(3.0, bad_from=1 + 4 + 2)  # the warm-up call, one replay, then wrong
    x = torch.ones(4)
    outs = [torch.empty(4) for _ in range(4)]
    times, wrong = _alternate.time_in_turns(ctx, {"good": good, "bad": bad}, x, outs, rounds=3,
                                            eager_calls=5, expect=3.0)
    assert good.captures == bad.captures == 1
    assert set(times) == {(m, k) for m in ("graph", "eager") for k in ("good", "bad")}
    assert all(len(v) == 3 for v in times.values()) and len(barriers) == 3 * 2 * 2
    # One event interval per timing, spread over the calls timed.
    assert times[("graph", "good")] == [1e3 / 4] * 3 and times[("eager", "bad")] == [1e3 / 5] * 3
    # The bad variant goes wrong within its first eager run: then every later replay and eager run is.
    assert wrong == {"graph": 2 * 4, "eager": 3}
    unchecked = _alternate.time_in_turns(ctx, {"bad": bad}, x, outs, rounds=1, eager_calls=1)[1]
    assert unchecked == {"graph": 0, "eager": 0}


def test_the_round_ratio_pairs_each_round_before_taking_the_median():
    on, off = [1.0, 1.0, 5.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0, 6.0]  # per-round ratios 1, 1, 1.25, 1.25, 0.83
    assert _alternate.median_round_ratio(on, off) == 1.0  # the ratio of the medians would be 1.25
