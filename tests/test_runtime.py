"""distrib.init() / shutdown()."""
import pytest

import distrib
import workers


def test_init_is_idempotent_per_process():
    results = distrib.launch(workers.init_twice, nprocs=2, start_method="forkserver", timeout=120)
    assert results == [(True, 0), (True, 1)]


def test_without_a_launcher_a_process_is_a_world_of_one(clean_env):
    try:
        ctx = distrib.init()
        assert (ctx.info.rank, ctx.info.world_size) == (0, 1)
        assert ctx.coordinator.is_master() and ctx.coordinator.is_local_master()
        assert ctx.coordinator.broadcast(b"solo") == b"solo"
        assert ctx.coordinator.all_gather(b"x") == [b"x"]
        ctx.coordinator.barrier()
        ctx.coordinator.local_barrier()
        assert distrib.init() is ctx and distrib.get_context() is ctx
    finally:
        distrib.shutdown()
    assert not distrib.is_initialized()
    distrib.shutdown()  # idempotent


def test_partial_environment_is_an_error_naming_the_missing_variable(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(distrib.ConfigError, match="LOCAL_WORLD_SIZE is not set"):
        distrib.init()
    assert not distrib.is_initialized()


def test_get_context_before_init_raises(clean_env):
    with pytest.raises(distrib.ConfigError, match="has not been called"):
        distrib.get_context()


def test_the_layers_are_attributes_of_the_package_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, distrib; c = distrib.communicator.create; k = distrib.coordinator.Coordinator; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_outside_any_launch_one_line_says_it_is_a_world_of_one(clean_env):
    import subprocess
    import sys

    code = ("import distrib, torch; comm = distrib.communicator.create(); x = torch.ones(2); comm.all_reduce(x); "
            "distrib.init(); print(comm.world_size, x.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 [1.0, 1.0]"
    assert out.stderr.count("no launcher started this process") == 1, out.stderr
    assert "runs as a world of one rank" in out.stderr
