"""The dispatcher: building the chain on every rank alike, and routing each call."""
from __future__ import annotations

import functools
import logging

import torch

import distrib
from communicator_support import EvenOnly, register_fakes, run_ranks
from distrib.communicator import create
from distrib.communicator.dispatcher import not_imported
from distrib.testing import launch_conformance


def _default_chain():
    logging.basicConfig(level=logging.INFO)
    comm = create()
    names = [c.name for c in comm.chain]
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except ImportError:
        has_cupy = False
    result = (names, dict(comm.disabled), comm.describe(), repr(comm), has_cupy,
              comm.communicator_for(torch.ones(4)).name, comm.can_all_reduce(torch.ones(2, dtype=torch.complex64)))
    comm.close()
    return result


def test_the_default_chain_on_a_cpu_machine():
    for names, disabled, described, text, has_cupy, chosen, reason in run_ranks(_default_chain, 2):
        assert "gloo" in names and chosen == "gloo"
        if not has_cupy:
            assert "nccl" in disabled and "CuPy" in disabled["nccl"] and "ranks 0-1" in disabled["nccl"]
            assert "nccl" not in names
        assert "disabled" in described and "gloo" in text
        assert reason.startswith("no communicator can take it") and "complex64" in reason


def _routing():
    register_fakes()
    comm = create()
    names = [c.name for c in comm.chain]
    even = torch.full((4,), 1.0)
    odd = torch.full((5,), 1.0)
    routes = [comm.communicator_for(even).name, comm.communicator_for(odd).name]
    before = EvenOnly.calls
    comm.all_reduce(even)
    comm.all_reduce(odd)
    calls = EvenOnly.calls - before
    disabled = dict(comm.disabled)
    try:
        comm["missing_on_rank_one"]
        lookup = None
    except KeyError as exc:
        lookup = str(exc)
    comm.close()
    return names, routes, calls, even.tolist(), odd.tolist(), disabled, lookup


def test_fast_paths_are_tried_in_priority_order_and_fall_back():
    for names, routes, calls, even, odd, disabled, lookup in run_ranks(_routing, 2):
        # Highest priority first; the ones some rank cannot start are left out everywhere.
        assert names[:2] == ["even_only", "gloo"]
        assert routes == ["even_only", "gloo"]
        assert calls == 1
        assert even == [2.0] * 4 and odd == [2.0] * 5
        assert disabled["missing_on_rank_one"] == "rank 1: needs hardware this rank lacks"
        assert "rank 1: peer access test failed" in disabled["fails_on_rank_one"]
        assert "needs_environment" not in disabled  # no priority: only tried when named
        assert "needs hardware" in lookup


def _explicit_order(order, options=None):
    register_fakes()
    comm = create(order=order, options=options)
    result = [c.name for c in comm.chain], sorted(comm.disabled), comm["gloo"].timeout
    comm.close()
    return result


def test_an_explicit_order_and_options():
    names, disabled, timeout = run_ranks(_explicit_order, 2, ["gloo", "needs_environment"],
                                         {"gloo": {"timeout": 7.0}})[0]
    assert names == ["gloo"] and disabled == ["needs_environment"] and timeout == 7.0
    names, disabled, _ = run_ranks(_explicit_order, 2, ["needs_environment", "gloo"])[0]
    assert disabled == ["needs_environment"]


def _not_imported_is_reported():
    not_imported["broken_builtin"] = "its module failed to import: ImportError: no _tables"
    comm = create()
    reason = comm.disabled.get("broken_builtin")
    comm.close()
    return reason


def test_a_builtin_that_failed_to_import_is_listed_as_disabled():
    assert run_ranks(_not_imported_is_reported, 2) == ["ranks 0-1: its module failed to import: ImportError: no _tables"] * 2


def _nothing_can_start():
    register_fakes()
    try:
        create(order=["missing_on_rank_one"])
    except distrib.CommunicatorError as exc:
        return str(exc)
    return None


def test_an_empty_chain_is_an_error_on_every_rank():
    for message in run_ranks(_nothing_can_start, 2):
        assert message and "no communicator could start" in message and "rank 1" in message


def test_the_dispatcher_passes_the_conformance_suite():
    for report in launch_conformance(create, 2, start_method="forkserver", timeout=240):
        assert report.communicator == "dispatcher" and not report.skipped
    for report in launch_conformance(functools.partial(create, order=["gloo"]), 3,
                                     start_method="forkserver", timeout=240):
        assert "debug_mode" in report.passed
