"""NCCL through CuPy on real GPUs (``-m gpu``; needs at least 2 GPUs and CuPy with NCCL).

Run on a GPU machine with::

    python -m pytest -m gpu tests/communicator/test_nccl_communicator.py -q
"""
from __future__ import annotations

import functools
import os

import pytest

import distrib
from distrib.testing import DEFAULT_SHAPES, launch_conformance

pytestmark = pytest.mark.gpu

# NVLink multicast stays off on the shared GPU machines (inherited by the ranks).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"


def _gpus_or_reason():
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return 0, "no CUDA GPU"
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        return 0, f"CuPy is not installed ({exc})"
    if not getattr(nccl, "available", False):
        return 0, "CuPy cannot load NCCL"
    count = torch.cuda.device_count()
    return count, None if count >= 2 else f"needs 2 GPUs, {count} visible"


GPUS, SKIP_REASON = _gpus_or_reason()
needs_gpus = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
SHAPES = DEFAULT_SHAPES + (((1 << 20) + 3,), (1 << 22,))
WORLD_SIZES = sorted({2, GPUS}) if GPUS >= 2 else [2]


def _conformance(spec, nprocs, **options):
    return launch_conformance(spec, nprocs, devices=list(range(nprocs)), start_method="spawn",
                              timeout=280, **options)


@needs_gpus
@pytest.mark.parametrize("nprocs", WORLD_SIZES)
def test_nccl_conformance_with_torch_tensors_and_cuda_graphs(nprocs):
    for report in _conformance("nccl", nprocs, shapes=SHAPES, graph=True):
        assert {"all_reduce", "all_reduce_out", "all_gather", "reduce_scatter", "broadcast", "bad_inputs",
                "debug_mode", "cuda_graph", "caller_stream", "close"} <= set(report.passed), report
        assert not report.declined, report.declined


@needs_gpus
def test_nccl_conformance_with_cupy_arrays_and_cupy_graphs():
    for report in _conformance("nccl", 2, library="cupy", graph=True):
        assert "cuda_graph" in report.passed and "all_reduce" in report.passed, report


@needs_gpus
def test_nccl_conformance_with_bare_cuda_array_interface_objects():
    for report in _conformance("nccl", 2, library="cuda_array_interface"):
        assert "all_reduce" in report.passed and "bad_inputs" in report.passed, report


@needs_gpus
def test_dispatcher_conformance_on_gpus():
    from distrib.communicator import create

    spec = functools.partial(create, order=["nccl", "gloo"])
    for report in _conformance(spec, 2, graph=True):
        assert report.communicator == "dispatcher" and "cuda_graph" in report.passed, report


def _routing_and_errors():
    import torch

    import distrib
    from distrib.communicator import DType, create, nccl as nccl_module
    from distrib.communicator.nccl import NcclCommunicator

    ctx = distrib.init()
    comm = create(order=["nccl", "gloo"])
    gpu = torch.ones(8, device="cuda")
    cpu = torch.ones(8)
    routes = (comm.communicator_for(gpu).name, comm.communicator_for(cpu).name)
    comm.all_reduce(gpu)
    comm.all_reduce(cpu)
    values = (gpu.sum().item(), cpu.sum().item())
    comm.close()
    absent = NcclCommunicator.unavailable_reason(ctx.coordinator, torch.cuda.device_count() + 3)

    # An NCCL error (a data type NCCL does not know, on every rank) becomes ours,
    # with NCCL's own message, and leaves the communicator unusable.
    nccl = NcclCommunicator(ctx.coordinator, ctx.device)
    saved = nccl_module.ncclDataType_t[DType.FLOAT32]
    nccl_module.ncclDataType_t[DType.FLOAT32] = 99
    try:
        nccl.all_reduce(torch.ones(8, device="cuda"))
        error = None
    except distrib.CommunicatorError as exc:
        error = str(exc)
    finally:
        nccl_module.ncclDataType_t[DType.FLOAT32] = saved
    afterwards = nccl.can_all_reduce(torch.ones(8, device="cuda"))
    nccl.close()  # aborts, since it is broken
    return routes, values, absent, error, afterwards


@needs_gpus
def test_routing_unavailability_and_nccl_errors():
    for routes, values, absent, error, afterwards in distrib.launch(
            _routing_and_errors, 2, devices=[0, 1], start_method="spawn", timeout=280):
        assert routes == ("nccl", "gloo")
        assert values == (16.0, 16.0)
        assert absent and "does not exist" in absent
        assert error and "NCCL all_reduce failed" in error and "NCCL_ERROR" in error
        assert afterwards and "unusable" in afterwards


@needs_gpus
def test_our_nccl_tables_match_cupys_constants():
    from cupy.cuda import nccl

    from distrib.communicator import DType, ReduceOp
    from distrib.communicator.nccl import ncclDataType_t, ncclRedOp_t

    assert ncclDataType_t[DType.FLOAT16] == nccl.NCCL_FLOAT16
    assert ncclDataType_t[DType.FLOAT32] == nccl.NCCL_FLOAT32
    assert ncclDataType_t[DType.FLOAT64] == nccl.NCCL_FLOAT64
    assert ncclDataType_t[DType.INT8] == nccl.NCCL_INT8 and ncclDataType_t[DType.UINT8] == nccl.NCCL_UINT8
    assert ncclDataType_t[DType.INT32] == nccl.NCCL_INT32 and ncclDataType_t[DType.INT64] == nccl.NCCL_INT64
    assert ncclDataType_t[DType.BFLOAT16] == getattr(nccl, "NCCL_BFLOAT16", 9)
    assert [ncclRedOp_t[o] for o in (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN)] == \
        [nccl.NCCL_SUM, nccl.NCCL_PROD, nccl.NCCL_MAX, nccl.NCCL_MIN]
    assert ncclRedOp_t[ReduceOp.AVG] == getattr(nccl, "NCCL_AVG", 4)
