"""The Communicator interface and its helpers, in this process (no launch)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distrib.communicator import (
    Collective,
    Communicator,
    DType,
    Dispatcher,
    ReduceOp,
    TensorView,
    communicators,
)
from distrib.communicator._tensors import as_view, debug_enabled, device_index, output_view
from distrib.communicator.gloo import GlooCommunicator
from distrib.communicator.nccl import NcclCommunicator, ncclDataType_t, ncclRedOp_t
from distrib.errors import CommunicatorError, ConfigError, DistribError


def test_reduce_op_parses_names_in_any_case():
    assert ReduceOp.parse("SUM") is ReduceOp.SUM
    assert ReduceOp.parse("avg") is ReduceOp.AVG
    assert ReduceOp.parse(ReduceOp.MAX) is ReduceOp.MAX
    assert str(ReduceOp.PROD) == "prod" and f"{ReduceOp.MIN}" == "min"


def test_unknown_reduce_op_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="median.*sum, prod, max, min, avg"):
        ReduceOp.parse("median")
    with pytest.raises(ConfigError):
        ReduceOp.parse(3)


def test_dtypes_know_their_size_and_kind():
    assert [d.itemsize for d in (DType.INT8, DType.BFLOAT16, DType.FLOAT32, DType.INT64)] == [1, 2, 4, 8]
    assert DType.BFLOAT16.is_floating_point and not DType.INT32.is_floating_point
    assert str(DType.BFLOAT16) == "bfloat16"


def test_communicator_is_abstract():
    with pytest.raises(TypeError):
        Communicator(SimpleNamespace(rank=0, world_size=1))  # type: ignore[abstract]

    class OnlyAllGather(Communicator):  # misses _make_token, _initialize, _close
        def _all_gather(self, src, dst):
            pass

    with pytest.raises(TypeError, match="_close.*_initialize.*_make_token"):
        OnlyAllGather(SimpleNamespace(rank=0, world_size=1))  # type: ignore[abstract]


def test_supported_collectives_follow_the_implemented_hooks():
    class AllReduceOnly(Communicator):
        def _make_token(self): return b""
        def _initialize(self, token): pass
        def _all_reduce(self, src, dst, op): pass
        def _close(self): pass

    class SendRecvOnly(Communicator):
        def _make_token(self): return b""
        def _initialize(self, token): pass
        def _send(self, view, dst): pass
        def _recv(self, view, src): pass
        def _close(self): pass

    only = AllReduceOnly.__new__(AllReduceOnly)
    assert only.supports(Collective.ALL_REDUCE)
    assert not any(only.supports(c) for c in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER,
                                              Collective.BROADCAST, Collective.SEND, Collective.RECV))
    p2p = SendRecvOnly.__new__(SendRecvOnly)
    assert [c for c in Collective if p2p.supports(c)] == [Collective.SEND, Collective.RECV]
    gloo = GlooCommunicator.__new__(GlooCommunicator)
    assert all(gloo.supports(c) for c in Collective)


def test_registry_holds_the_builtins_and_names_the_known_ones():
    assert communicators.get("gloo") is GlooCommunicator
    assert communicators.get("nccl") is NcclCommunicator
    with pytest.raises(ConfigError, match="unknown communicator 'nope'.*gloo.*nccl"):
        communicators.get("nope")


def test_view_of_a_torch_tensor():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    v = as_view(t)
    assert (v.ptr, v.numel, v.shape, v.dtype, v.device_type, v.contiguous, v.library) == \
        (t.data_ptr(), 12, (3, 4), DType.FLOAT32, "cpu", True, "torch")
    assert v.nbytes == 48 and v.obj is t and as_view(v) is v
    assert not as_view(t.t()).contiguous
    assert as_view(t[1:]).ptr == t.data_ptr() + 16


def test_view_of_unsupported_things():
    odd = as_view(torch.zeros(3, dtype=torch.complex64))
    assert odd.dtype is None and odd.dtype_name == "complex64"
    assert as_view(torch.empty(2, device="meta")).device_type == "meta"
    with pytest.raises(CommunicatorError, match="expected a torch tensor or a CuPy array.*got list"):
        as_view([1, 2])


def test_numpy_arrays_are_read_through_dlpack_without_a_copy():
    a = np.arange(6, dtype=np.int64)
    v = as_view(a)
    assert v.obj is a and v.dtype is DType.INT64 and v.tensor.data_ptr() == a.ctypes.data


def test_cuda_array_interface_layouts():
    class Fake:
        def __init__(self, strides):
            self.__cuda_array_interface__ = {"shape": (4, 6), "typestr": "<f2", "data": (4096, False),
                                             "strides": strides, "version": 3}

    assert as_view(Fake(None)).contiguous
    assert as_view(Fake((12, 2))).contiguous
    transposed = as_view(Fake((2, 8)))
    assert not transposed.contiguous and transposed.dtype is DType.FLOAT16
    assert transposed.device_type == "cuda" and transposed.library == "cuda_array_interface"


def _view(t):
    return as_view(t)


def test_output_views_check_what_they_are_given():
    x = torch.ones(4, 3)
    assert output_view(Collective.ALL_REDUCE, _view(x), None, 2).obj is x
    assert output_view(Collective.ALL_REDUCE, _view(x), x, 2).obj is x
    assert output_view(Collective.ALL_GATHER, _view(x), None, 2).shape == (2, 4, 3)
    assert output_view(Collective.REDUCE_SCATTER, _view(x), None, 2).shape == (2, 3)
    assert output_view(Collective.REDUCE_SCATTER, _view(torch.ones(1, 6)), None, 2).shape == (3,)
    for out, words in [(torch.ones(3, 4), "shape"), (torch.ones(4, 3, dtype=torch.float64), "dtype"),
                       (torch.ones(3, 4).t(), "contiguous")]:
        with pytest.raises(CommunicatorError, match=words):
            output_view(Collective.ALL_REDUCE, _view(x), out, 2)
    buffer = torch.ones(16)
    with pytest.raises(CommunicatorError, match="overlaps"):
        output_view(Collective.ALL_REDUCE, _view(buffer[:8]), buffer[4:12], 2)
    with pytest.raises(CommunicatorError, match="12 elements, expected 24"):
        output_view(Collective.ALL_GATHER, _view(x), torch.ones(12), 2)


def test_device_arguments():
    assert device_index(None) is None and device_index("cpu") is None
    assert device_index(3) == 3 and device_index("cuda:1") == 1 and device_index(torch.device("cuda", 2)) == 2
    for bad in (-1, True, "gpu", "cuda:x", 1.5):
        with pytest.raises(ConfigError, match="device="):
            device_index(bad)


def test_debug_mode_follows_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("DISTRIB_DEBUG", raising=False)
    assert not debug_enabled(None) and debug_enabled(True)
    monkeypatch.setenv("DISTRIB_DEBUG", "1")
    assert debug_enabled(None) and not debug_enabled(False)
    monkeypatch.setenv("DISTRIB_DEBUG", "0")
    assert not debug_enabled(None)


def test_nccl_tables_cover_every_dtype_and_op_with_distinct_codes():
    assert set(ncclDataType_t) == set(DType) == NcclCommunicator.dtypes
    assert len(set(ncclDataType_t.values())) == len(ncclDataType_t)
    assert ncclDataType_t[DType.BFLOAT16] == 9 and ncclDataType_t[DType.FLOAT32] == 7
    assert set(ncclRedOp_t) == set(ReduceOp) and ncclRedOp_t[ReduceOp.AVG] == 4


def test_nccl_says_why_it_is_unavailable_without_cupy():
    pytest.importorskip("torch")
    try:
        import cupy  # noqa: F401
    except ImportError:
        reason = NcclCommunicator.unavailable_reason(SimpleNamespace(rank=0, world_size=2), 0)
        assert reason is not None and "CuPy" in reason and "distrib[cuda13]" in reason
    else:
        pytest.skip("CuPy is installed here")


def _stub_coordinator():
    return SimpleNamespace(rank=0, world_size=1, is_master=lambda: True)


@pytest.mark.parametrize("order, words", [
    ("gloo", "must be a list"),
    (["gloo", "gloo"], "twice"),
    (["gloo", "nope"], "unknown communicator 'nope'.*known: .*gloo"),
])
def test_dispatcher_rejects_a_bad_order_before_any_collective(order, words):
    with pytest.raises(ConfigError, match=words):
        Dispatcher(_stub_coordinator(), None, order)


def test_errors_are_one_family():
    assert issubclass(CommunicatorError, DistribError) and issubclass(ConfigError, DistribError)
    assert TensorView._fields[:3] == ("obj", "ptr", "numel")
