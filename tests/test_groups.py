"""Groups: TP x PP x DP layouts, group coordinators and communicators, send/recv, on gloo."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import distrib
import group_workers
from distrib.coordinator.api import Coordinator
from distrib.errors import ConfigError, CoordinatorError
from distrib.info import LaunchInfo

FAST = dict(devices="cpu", start_method="forkserver", timeout=240)


def test_tp2_pp2_dp2_on_eight_ranks_every_group_collective_is_exact():
    results = distrib.launch(group_workers.layout_collectives, 8, args=(2, 2, 2), **FAST)
    for rank, out in enumerate(results):
        tp_rank, pp_rank, dp_rank = rank % 2, rank // 2 % 2, rank // 4
        assert out["coords"] == (tp_rank, pp_rank, dp_rank)
        assert out["sizes"] == (2, 2, 2)
        assert out["stages"] == (pp_rank == 0, pp_rank == 1)
        expected = {"tp": (rank - tp_rank, rank - tp_rank + 1),  # consecutive ranks
                    "pp": (rank - 2 * pp_rank, rank - 2 * pp_rank + 2),  # the stages of one replica
                    "dp": (rank % 4, rank % 4 + 4)}  # the same shard in each replica
        for name, ranks in expected.items():
            group = out[name]
            assert group["ranks"] == ranks, (rank, name, group)
            assert group["rank"] == ranks.index(rank) and group["world_size"] == 2
            assert group["is_master"] == (rank == ranks[0])
            assert group["is_local_master"] == (rank == ranks[0])  # one node
            assert group["local"] == (ranks.index(rank), 2, 0, 1)
            assert group["all_gather"] == [str(r) for r in ranks]
            assert group["broadcast"] == str(ranks[-1])
            assert group["all_reduce"] == [float(sum(r + 1 for r in ranks))]
            assert group["comm_all_gather"] == list(ranks)
            assert group["comm_broadcast"] == [float(ranks[-1])]
            whole = sum(torch.arange(4.0) + r for r in ranks)
            assert group["reduce_scatter"] == whole.view(2, 2)[ranks.index(rank)].tolist()
            assert group["channel"] == {"from": ranks[0]}
            if rank != ranks[0]:
                assert f"the writer (rank {ranks[0]}) closed" in group["channel_closed"], group
            assert group["describe"] == f"group {name} (ranks {ranks[0]}, {ranks[1]})" \
                or group["describe"] == f"group {name} (ranks {ranks[0]}-{ranks[1]})"


def test_groups_used_at_once_from_two_threads_stay_exact():
    calls = 60
    results = distrib.launch(group_workers.groups_from_threads, 4, args=(calls,), **FAST)
    for rank, out in enumerate(results):
        assert not out["errors"], out["errors"]
        for name in ("tp", "dp"):
            ranks = out["ranks"][name]
            assert rank in ranks
            assert out["sums"][name] == [float(sum(r * 1000 + i for r in ranks)) for i in range(calls)]


def test_a_rank_in_no_group_gets_none_at_once_and_is_never_waited_for():
    results = distrib.launch(group_workers.outsider, 4, args=(20,), **FAST)
    outside = results[3]
    assert outside["group"] is None and outside["returned_in"] < 1.0
    for out in results[:3]:
        assert out["group"] == (0, 1, 2) and out["sum"] == 6.0
        assert out["done_in"] < 15, out  # rank 3 sleeps for 20 s


def test_split_orders_by_key_and_groups_nest():
    results = distrib.launch(group_workers.split_and_nest, 8, **FAST)
    for rank, out in enumerate(results):
        members = tuple(r for r in range(7, -1, -1) if r % 2 == rank % 2)  # key=-rank: descending
        group_rank, ranks, text = out["parity"]
        assert ranks == members and group_rank == members.index(rank)
        assert text.startswith("group parity (ranks ")
        assert out["skip"] is True if rank == 7 else out["skip"] == tuple(range(7))
        middle = members[1:3]
        if rank in middle:
            sub_rank, sub_ranks, total, gathered, described, nested = out["sub"]
            assert sub_ranks == middle and sub_rank == middle.index(rank)
            assert total == float(sum(middle))
            assert gathered == [b"%d" % r for r in middle]
            assert "group middle" in described
            assert nested == ((middle[1],) if rank == middle[1] else None)
        else:
            assert "sub" not in out


def test_a_late_replica_holds_no_other_replica_back():
    delay, calls = 3.0, 20
    results = distrib.launch(group_workers.late_replica, 4, args=(2, delay, calls), **FAST)
    early = [out for out in results if out["replica"] == 0]
    late = [out for out in results if out["replica"] == 1]
    for out in early:
        # Replica 0 made its TP group and communicator and ran its all-reduces
        # while replica 1 was still asleep.
        assert out["done"] < min(o["began"] for o in late), (out, late)
        assert out["done"] - out["start"] < delay
    for out in late:
        assert out["began"] - out["start"] >= delay


def test_a_group_member_that_never_arrives_is_named_by_global_rank():
    timeout = 3.0
    results = distrib.launch(group_workers.never_arrives, 4, args=(3, timeout), **FAST)
    out = results[1]
    assert out["missing"] == (3,), out
    assert "rank 3 never arrived" in out["message"] and "group pair (ranks 1, 3)" in out["message"]
    assert timeout <= out["after"] < timeout + 5


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_member_that_dies_before_its_group_ends_the_launch_at_once_naming_it(how):
    import time

    start = time.monotonic()
    with pytest.raises(distrib.WorkerFailedError) as info:
        distrib.launch(group_workers.dies_before_its_group, 4, args=(how,), **FAST)
    assert time.monotonic() - start < 20  # not the group's 300 s timeout
    root = str(info.value).splitlines()[0]
    assert "rank 3" in root and "root cause" in root, str(info.value)


def test_a_member_that_never_creates_the_group_communicator_is_named():
    timeout = 3.0
    results = distrib.launch(group_workers.communicator_never_arrives, 4, args=(timeout,), **FAST)
    out = results[0]
    assert out["missing"] == (2,), out
    assert "rank 2 never arrived" in out["message"] and "group pair" in out["message"]
    assert out["after"] < timeout + 5


def test_pipeline_stages_send_and_receive_tensors_and_tensor_dicts_exactly():
    results = distrib.launch(group_workers.pipeline_send_recv, 4, **FAST)
    for rank in (2, 3):  # stage 1, from rank - 2
        out, sender = results[rank], rank - 2
        for i, ((dtype, shape), got) in enumerate(zip(out["cases"], out["received"])):
            n = torch.Size(shape).numel()
            want = (torch.arange(max(1, n)) % 97 + sender * 10 + i)[:n].to(dtype).reshape(shape)
            assert got.dtype == dtype and got.shape == torch.Size(shape) and torch.equal(got, want), (rank, i)
        sent = results[sender]["sent_hidden"]
        assert torch.equal(out["dict"]["hidden"], sent)
        assert torch.equal(out["dict"]["residual"], sent.t())
        assert out["dict"]["step"] == 7 and out["dict"]["ids"] == [1, 2]
        assert torch.equal(results[sender]["back"], sent * 2)


def test_a_stage_that_never_sends_is_named_within_the_timeout():
    timeout = 3.0
    results = distrib.launch(group_workers.stage_never_sends, 2, args=(timeout,), **FAST)
    out = results[1]
    assert out["missing"] == (0,), out
    assert "recv from rank 0" in out["message"] and "rank 0 never made the matching send" in out["message"]
    assert "group pp" in out["message"]
    assert timeout <= out["after"] < timeout + 5


def test_the_conformance_suite_passes_on_a_group():
    results = distrib.launch(group_workers.conformance_on_group, 4, **FAST)
    assert results[0] is None and results[2] is None
    for rank in (1, 3):
        passed, skipped = results[rank]
        assert "all_reduce" in passed and "send_recv" in passed and not skipped, (passed, skipped)


# -- in this process: argument checks that need no peer ----------------------------------

class _Local(Coordinator):
    """A coordinator of a world of ``world_size`` with no peers: collectives must not be reached."""

    name = "local"

    def broadcast(self, data, src=0, timeout=None):
        raise AssertionError("a collective was reached")

    all_gather = barrier = local_barrier = broadcast

    def _close(self):
        pass


def _local(world_size: int = 4, rank: int = 1) -> _Local:
    return _Local(LaunchInfo(launch_id="t", rank=rank, world_size=world_size, local_rank=rank,
                             local_world_size=world_size, node_rank=0, nnodes=1,
                             master_addr="127.0.0.1", master_port=1))


@pytest.mark.parametrize("ranks, words", [
    ([], "empty"), ([0, 4], "4 is out of range"), ([-1], "out of range"), ([1, 1], "rank 1 twice"),
    ([0, "1"], "not an int"), ("01", "list of ranks"), ([True], "not an int"),
])
def test_bad_group_ranks_are_config_errors_before_any_collective(ranks, words):
    with pytest.raises(ConfigError, match=words):
        _local().group(ranks)


def test_a_non_member_gets_none_without_any_collective():
    assert _local(rank=1).group([0, 2]) is None


def test_a_coordinator_without_groups_says_so():
    with pytest.raises(CoordinatorError, match="groups are not supported by the local coordinator"):
        _local(rank=1).group([1, 2])


@pytest.mark.parametrize("sizes, words", [
    (dict(tp=3), "does not divide the world size 8"),
    (dict(tp=2, pp=2, dp=3), "= 12, but the world size is 8"),
    (dict(tp=0), "tp=0 must be an int >= 1"),
    (dict(tp=2, pp=1.5), "pp=1.5 must be an int"),
    (dict(tp=4, nodes=(4, 2)), None),  # fits: 4 ranks per node
    (dict(tp=8, nodes=(4, 2)), "would span nodes, which hold 4 ranks each"),
    (dict(tp=3, dp=2, world=6, nodes=(2, 3)), "would span nodes"),
])
def test_bad_layouts_are_config_errors_before_any_collective(sizes, words):
    nodes = sizes.pop("nodes", (8, 1))
    world = sizes.pop("world", 8)
    fake = SimpleNamespace(world_size=world, rank=0, local_world_size=nodes[0], nnodes=nodes[1],
                           group=lambda *a, **k: (_ for _ in ()).throw(AssertionError("group() reached")))
    if words is None:
        with pytest.raises(AssertionError, match="group\\(\\) reached"):
            distrib.parallel.layout(coordinator=fake, **sizes)
        return
    with pytest.raises(ConfigError, match=words):
        distrib.parallel.layout(coordinator=fake, **sizes)


def test_tp_across_nodes_is_allowed_when_asked():
    fake = SimpleNamespace(world_size=8, rank=0, local_world_size=4, nnodes=2,
                           group=lambda *a, **k: (_ for _ in ()).throw(AssertionError("group() reached")))
    with pytest.raises(AssertionError, match="group\\(\\) reached"):
        distrib.parallel.layout(tp=8, coordinator=fake, tp_within_node=False)
