"""Collectives under torch.compile on CPU ranks (gloo): the same user code, traced without graph breaks.

One launch of 2 ranks runs every compiled check (compiling is slow on small
machines; the ranks start once); the tests below assert on what it found.
The workers are in compile_support.py (the GPU tests use them too).
"""
from __future__ import annotations

import pytest
import torch

import compile_support
from communicator_support import run_ranks
from distrib.communicator import _handles, _ops
from distrib.errors import CommunicatorError

BACKENDS = ("aot_eager", "inductor")
FORMS = ("in_place", "out_of_place")


@pytest.fixture(scope="module")
def found() -> list[dict]:
    return run_ranks(compile_support.run_everything_on_cpu, 2, timeout=280)


def test_the_ranks_really_split_the_model(found):
    for rank in found:
        assert rank["mlp"]["member"] == "gloo"
        assert rank["mlp"]["eager/in_place"] and rank["mlp"]["eager/out_of_place"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_a_compiled_tensor_parallel_mlp_equals_eager_and_the_unsplit_model(found, backend, form):
    for rank in found:
        case = rank["mlp"][f"{backend}/{form}"]
        # Integers in float32: exact whatever the summation order, so equal means equal.
        assert case["equal"] and case["max_abs_diff"] == 0.0, case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_one_graph_without_breaks_compiled_once_for_every_call(found, backend, form):
    op = "distrib.all_reduce_.default" if form == "in_place" else "distrib.all_reduce_out.default"
    for rank in found:
        case = rank["mlp"][f"{backend}/{form}"]
        assert case["graph_breaks"] == 0 and case["recompiles"] == 0, case
        assert case["frames"] == 1, case  # three calls with fresh inputs, one compilation
        assert case["ops"] == [op, op], case  # both blocks' all-reduces are distrib's operator


def test_eager_calls_after_compiling_still_agree(found):
    assert all(rank["mlp"]["eager_after"] for rank in found)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_gather_reduce_scatter_ops_and_broadcast_compile(found, backend):
    names = ["all_gather", "all_gather out=", "reduce_scatter", "reduce_scatter max out=", "all_reduce avg",
             "broadcast"]
    for rank in found:
        assert rank["collectives"]["eager"]
        assert dict(zip(names, rank["collectives"][backend])) == dict.fromkeys(names, True)


@pytest.mark.parametrize("case, words", [
    ("closed_at_trace", ["CommunicatorError", "traced with a closed communicator"]),
    ("other_device", ["CommunicatorError", "expects CPU tensors, got a tensor on meta"]),
    ("bad_out", ["CommunicatorError", "out has shape [3] but the input has [4]"]),
    ("bad_op", ["ConfigError", "unknown reduce op 'median'"]),
    ("indivisible", ["CommunicatorError", "divisible by world_size=2, got 3"]),
])
def test_bad_calls_fail_while_compiling_with_the_eager_message(found, case, words):
    for rank in found:
        error = rank["bad"][case]
        assert error["raised"], case
        for word in words:
            assert word in error["message"], error["message"]


def test_a_communicator_closed_after_compiling_raises_at_call_time(found):
    for rank in found:
        assert rank["bad"]["before_close"] == [4.0] * 4
        error = rank["bad"]["closed_at_call"]
        assert error["raised"] and error["types"][0] == "CommunicatorError"
        assert "closed" in error["message"]
        assert rank["bad"]["still_works"] == [2.0] * 4


# -- without ranks -----------------------------------------------------------------------------

def test_the_operators_declare_what_they_write():
    written = {}
    for name in ("all_reduce_", "all_reduce_out", "all_gather_out", "reduce_scatter_out", "broadcast_"):
        schema = _ops.operator(name)._schema
        written[name] = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == {"all_reduce_": ["tensor"], "all_reduce_out": ["out"], "all_gather_out": ["out"],
                       "reduce_scatter_out": ["out"], "broadcast_": ["tensor"]}


def test_an_unknown_handle_is_a_clear_error():
    class Anything:
        pass

    thing = Anything()
    handle = _handles.register(thing)
    assert _handles.lookup(handle) is thing
    del thing  # the registry does not keep communicators alive
    with pytest.raises(CommunicatorError, match=f"no communicator has handle {handle} in this process"):
        _handles.lookup(handle)
    with pytest.raises(CommunicatorError, match="no communicator has handle"):
        _ops.operator("all_reduce_")(torch.ones(2), handle, "sum")


def test_not_compiling_outside_torch_compile():
    assert _handles.compiling() is False
    assert torch.compile(lambda x: x + int(_handles.compiling()), fullgraph=True,
                         backend="eager")(torch.zeros(1)).item() == 1
