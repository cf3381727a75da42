"""all_reduce_add_rms_norm on CPU ranks (gloo): the unfused sequence, its checks, and torch.compile.

One launch of 2 ranks runs every check (see fused_support.py); the tests
assert on what it found. The fused kernel itself is checked on GPUs
(test_fused_rms_norm_gpu.py) and compiled for every type and world size by
test_custom_kernel_source.py.
"""
from __future__ import annotations

import pytest

import fused_support
from communicator_support import run_ranks


@pytest.fixture(scope="module")
def found() -> list[dict]:
    return run_ranks(fused_support.run_on_cpu, 2, timeout=280)


def test_residual_is_bitwise_the_unfused_sequence_and_the_norm_within_one_ulp(found):
    for rank in found:
        assert len(rank["eager"]) == 3 * 3 * len(fused_support.FORMS)
        for case in rank["eager"]:
            assert case["residual_equal"], case
            assert case["ulps"] <= 1, case
            assert case["kept"], case  # returned the right tensors; out-of-place inputs unchanged


def test_every_rank_gets_the_same_bits(found):
    assert [c["digest"] for c in found[0]["eager"]] == [c["digest"] for c in found[1]["eager"]]


def test_gloo_says_it_runs_the_unfused_sequence(found):
    for rank in found:
        assert "gloo" in rank["why_unfused"] and "no fused kernel" in rank["why_unfused"]


@pytest.mark.parametrize("case, words", [
    ("weight_shape", ["weight has shape [8], expected [16]"]),
    ("residual_dtype", ["residual has dtype float16, expected float32"]),
    ("int_dtype", ["x has dtype int32", "takes float16, bfloat16, float32"]),
    ("out_overlaps_residual", ["residual and out overlap"]),
    ("negative_eps", ["eps=-1.0 must be a finite number >= 0"]),
    ("not_a_tensor", ["residual must be a torch tensor, got list"]),
    ("not_contiguous", ["x is not contiguous"]),
])
def test_bad_calls_say_what_to_change(found, case, words):
    for rank in found:
        message = rank["bad"][case]
        assert message.startswith("CommunicatorError: dispatcher all_reduce_add_rms_norm"), message
        for word in words:
            assert word in message, message


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("form, op", [("in_place", "distrib.all_reduce_add_rms_norm_.default"),
                                      ("out_of_place", "distrib.all_reduce_add_rms_norm_out.default")])
def test_compiled_fullgraph_is_one_operator_with_the_eager_results(found, backend, form, op):
    for rank in found:
        case = rank["compiled"][f"{backend}/{form}"]
        assert case["right"], case
        assert case["graph_breaks"] == 0 and case["frames"] == 1, case
        assert case["ops"] == [op], case
