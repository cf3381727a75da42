"""Groups and CUDA IPC send/recv on GPUs (``pytest -m gpu``); ranks share the GPUs where there are fewer.

- world 8 as TP groups of 2 and of 4 at once, each with its own custom all-reduce, on their own
  streams: at least 10,000 exact checked all-reduces per group, eager and graph replay;
- a late peer in one TP group stops that group only (named by global rank); the other keeps
  working;
- send/recv through CUDA IPC: exact, eager and in a graph, aligned or not, messages larger than
  the slots; a peer that never sends is named and leaves NaN; a size mismatch is refused;
- the IPC communicator passes the conformance suite, on the whole launch and on a group;
- the dispatcher of a TP x PP layout sends all-reduces to the custom kernel and send/recv to IPC.
"""
from __future__ import annotations

import pytest

import distrib
from distrib.testing import groups as scenarios
from distrib.testing.conformance import launch_conformance
from distrib.testing.placement import placement

pytestmark = pytest.mark.gpu


def _launch(fn, nprocs, *args, timeout=600, **kwargs):
    return distrib.launch(fn, nprocs=nprocs, args=args, kwargs=kwargs, timeout=timeout,
                          start_method="forkserver", **placement(nprocs))


def test_tp_groups_of_2_and_4_all_reduce_at_once_ten_thousand_times_each_exactly():
    results = _launch(scenarios.concurrent_tp_groups, 8, (2, 4), 5000, 50, 100)
    for rank, out in enumerate(results):
        for tp, group in out["groups"].items():
            first = rank // tp * tp
            assert group["ranks"] == tuple(range(first, first + tp)), (rank, tp, group)
            assert group["eager"] == 5000 and group["graph"] == 5000, group
            assert group["wrong"] == 0 and group["nan"] == 0, (rank, tp, group)


def test_a_late_peer_in_one_tp_group_stops_that_group_only():
    results = _launch(scenarios.late_peer_in_one_group, 4, 2.0, 5.0)
    for rank in (0, 1):  # TP group 0: rank 1 stalled; its stopped calls are NaN, never wrong
        out = results[rank]
        assert out["wrong"] == 0 and out["nan"] > 0 and out["errors"], (rank, out)
        assert "group tp (ranks 0-1)" in out["errors"][0], out["errors"][0]
        assert "rank 1" in out["errors"][0], out["errors"][0]
    assert "gave up after 2s waiting for rank 1" in results[0]["errors"][0]
    assert results[0]["first_error_at"] < 2.0 + 3.0
    for rank in (2, 3):  # TP group 1 kept working, exactly, the whole time
        out = results[rank]
        assert not out["errors"] and out["wrong"] == out["nan"] == 0 and out["checked"] > 100, (rank, out)


@pytest.mark.parametrize("world", (2, 4))
def test_ipc_send_recv_is_exact_eager_and_in_a_graph(world):
    results = _launch(scenarios.ipc_ring, world, 20, 20)
    for rank, out in enumerate(results):
        assert out["checked"] == 40 * len(scenarios.MESSAGES) and not out["wrong"], (rank, out)


def test_an_ipc_peer_that_never_sends_is_named_and_leaves_nan():
    results = _launch(scenarios.ipc_never_sends, 2, 2.0)
    waiting, silent = results[1], results[0]
    assert waiting["nan"] is True
    assert "rank 0 sent nothing" in waiting["next_call"], waiting
    assert 2.0 <= waiting["after"] < 6.0
    assert silent["next_call"] and "rank 1 had given up on rank 0" in silent["next_call"], silent


def test_an_ipc_recv_of_another_size_is_refused_naming_the_sender():
    results = _launch(scenarios.ipc_size_mismatch, 2)
    assert "rank 0 sent 4000 bytes of float32" in results[1]["check"], results[1]


@pytest.mark.parametrize("world", (2, 4))
def test_ipc_passes_the_conformance_suite(world):
    reports = launch_conformance("ipc", world, graph=True, start_method="forkserver", **placement(world))
    for report in reports:
        assert {"send_recv", "send_recv_graph", "caller_stream"} <= set(report.passed), report


def test_the_layout_dispatcher_sends_all_reduce_to_custom_and_send_recv_to_ipc():
    results = _launch(_layout_routes, 4)
    for rank, out in enumerate(results):
        stage = rank // 2 % 2
        assert out == {"all_reduce": "custom", "send": "ipc", "sum": 2.0 * (stage + 1), "received": 1.0}, out


def _layout_routes():
    import torch

    from distrib import communicator

    ctx = distrib.init()
    layout = distrib.parallel.layout(tp=2, pp=2)
    tp, pp = communicator.create(layout.tp), communicator.create(layout.pp)
    x = torch.full((1024,), float(layout.pp_rank + 1), dtype=torch.bfloat16, device="cuda")
    tp.all_reduce(x)
    y = torch.zeros(4096, device="cuda")
    if layout.is_first_stage:
        pp.send(torch.ones(4096, device="cuda"), 1)
        y.fill_(1.0)
    else:
        pp.recv(y, 0)
    torch.cuda.synchronize()
    routes = {"all_reduce": tp.communicator_for(x).name,
              "send": pp.communicator_for(y, collective="send").name}
    ctx.coordinator.barrier()
    return {**routes, "sum": x[0].item(), "received": y[0].item()}
