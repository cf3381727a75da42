"""torch.compile with the custom and NCCL communicators on GPUs (``pytest -m gpu``).

World size from the visible GPUs: one rank per GPU with 2 or more; with one
GPU, two ranks share it (``devices=[0, 0]``), which the custom kernel allows
and NCCL does not (``ncclInvalidUsage``), so NCCL cases need 2 GPUs.
The workers are in compile_support.py; data are small integers in float32,
so every result must be exact.
"""
from __future__ import annotations

import pytest

import compile_support
import distrib

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _devices(communicator: str) -> list[int]:
    gpus = _gpus()
    if gpus >= 2:
        return list(range(min(gpus, 4)))
    if communicator == "nccl":
        pytest.skip("NCCL cannot run two ranks on one GPU (ncclInvalidUsage); needs 2 GPUs, "
                    f"this machine has {gpus}")
    return [0, 0]  # two ranks sharing the one GPU


def _launch(fn, devices: list[int], *args, **kwargs):
    return distrib.launch(fn, len(devices), args=args, kwargs=kwargs, devices=devices,
                          share_gpu=len(set(devices)) < len(devices), start_method="spawn", timeout=600)


@pytest.mark.parametrize("name", ["custom", "nccl"])
def test_the_compiled_mlp_is_exact_with_each_gpu_communicator(name):
    devices = _devices(name)
    for rank in _launch(compile_support.compiled_mlp, devices, device="cuda", order=[name],
                        backends=("aot_eager", "inductor")):
        assert rank["member"] == name
        assert rank["eager/in_place"] and rank["eager/out_of_place"] and rank["eager_after"]
        for backend in ("aot_eager", "inductor"):
            for form in ("in_place", "out_of_place"):
                case = rank[f"{backend}/{form}"]
                assert case["equal"] and case["frames"] == 1 and case["graph_breaks"] == 0, (backend, form, case)


@pytest.mark.parametrize("name", ["custom", "nccl"])
def test_compiled_code_in_cuda_graphs_replays_exactly_with_fresh_inputs(name):
    devices = _devices(name)
    for rank in _launch(compile_support.compiled_cuda_graphs, devices, order=[name]):
        assert rank["member"] == name
        assert rank["manual/in_place"] == [True] * 4, rank
        assert rank["manual/out_of_place"] == [True] * 4, rank
        assert rank["reduce_overhead"] == [True] * 8, rank
