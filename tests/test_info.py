import dataclasses

import pytest

from distrib import ConfigError, LaunchInfo

BASE = dict(launch_id="abc", rank=1, world_size=4, local_rank=1, local_world_size=2,
            node_rank=0, nnodes=2, master_addr="10.0.0.1", master_port=29500, secret="s3cret")


def test_round_trip_through_env():
    info = LaunchInfo(**BASE)
    env = info.to_env()
    assert LaunchInfo.from_env(env) == info
    # torchrun's names are set too
    assert env["RANK"] == "1" and env["LOCAL_RANK"] == "1" and env["GROUP_RANK"] == "0"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["TORCHELASTIC_RUN_ID"] == "abc"


def test_frozen_and_secret_not_in_repr():
    info = LaunchInfo(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 2  # type: ignore[misc]
    assert "s3cret" not in repr(info)
    assert info.replace(rank=3).rank == 3


@pytest.mark.parametrize("var", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                 "MASTER_ADDR", "MASTER_PORT"])
def test_missing_variable_is_named(var):
    env = LaunchInfo(**BASE).to_env()
    del env[var]
    with pytest.raises(ConfigError, match=f"{var} is not set"):
        LaunchInfo.from_env(env)


@pytest.mark.parametrize("change, var, expected", [
    ({"RANK": "4"}, "RANK", "0 <= RANK < WORLD_SIZE=4"),
    ({"RANK": "-1"}, "RANK", "0 <= RANK"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK", "LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "5"}, "LOCAL_WORLD_SIZE", "WORLD_SIZE=4"),
    ({"NODE_RANK": "2", "GROUP_RANK": "2"}, "NODE_RANK", "NNODES=2"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT", "1..65535"),
    ({"WORLD_SIZE": "four"}, "WORLD_SIZE", "integer"),
])
def test_inconsistent_values_name_variable_and_expectation(change, var, expected):
    env = {**LaunchInfo(**BASE).to_env(), **change}
    with pytest.raises(ConfigError) as err:
        LaunchInfo.from_env(env)
    assert var in str(err.value) and expected in str(err.value)


def test_node_rank_and_group_rank_must_agree():
    env = {**LaunchInfo(**BASE).to_env(), "NODE_RANK": "0", "GROUP_RANK": "1"}
    with pytest.raises(ConfigError, match="NODE_RANK=0 and GROUP_RANK=1 disagree"):
        LaunchInfo.from_env(env)


def test_torchrun_style_environment_without_distrib_variables():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = LaunchInfo.from_env(env)
    assert (info.node_rank, info.nnodes, info.secret) == (0, 1, "")
    assert info.launch_id == "127.0.0.1:29500"


def test_multi_node_needs_node_rank():
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="NODE_RANK is not set"):
        LaunchInfo.from_env(env)


def test_members_sharing_a_gpu_follow_the_launchers_map():
    from distrib.info import LOCAL_GPUS_VAR, SHARE_GPU_VAR, members_sharing_a_gpu

    # Node 1 of two nodes of 4 ranks (ranks 4-7), GPUs 0, 0, 1, 1.
    info = LaunchInfo(**{**BASE, "rank": 5, "world_size": 8, "local_rank": 1, "local_world_size": 4,
                         "node_rank": 1, "nnodes": 2})
    shared = {SHARE_GPU_VAR: "2", LOCAL_GPUS_VAR: "0,0,1,1"}
    assert members_sharing_a_gpu(info, (4, 5), shared) == [4, 5]       # one GPU: shared
    assert members_sharing_a_gpu(info, (5, 7), shared) == []           # GPUs 0 and 1
    assert members_sharing_a_gpu(info, (1, 5), shared) == []           # rank 1 is on node 0
    assert members_sharing_a_gpu(info, (5,), shared) == []             # a group of one
    assert members_sharing_a_gpu(info, (4, 5, 6), shared) == [4, 5]
    assert members_sharing_a_gpu(info, (4, 5), {}) == []               # GPUs not shared
    # A sharing launch without the map: every pair on this node counts as sharing.
    assert members_sharing_a_gpu(info, (5, 7), {SHARE_GPU_VAR: "2"}) == [5, 7]
