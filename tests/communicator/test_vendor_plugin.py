"""An outside package adds a communicator through the entry point, and nothing else.

The fixture installs examples/vendor_plugin (editable) into this environment
when it is not there yet. Workers use the spawn start method: a fresh
interpreter reads the installed package's entry point and import path.
"""
from __future__ import annotations

import torch

import distrib
from communicator_support import run_ranks
from distrib.communicator import communicators, create
from distrib.testing import launch_conformance


def _found_through_the_entry_point():
    cls = communicators.get("vendor_example")
    default = create()
    chain = [c.name for c in default.chain]
    default.close()
    only = create(order=["vendor_example"])
    x = torch.full((6,), float(distrib.init().rank + 1))
    chosen = only.communicator_for(x).name
    only.all_reduce(x)
    only.close()
    return cls.__module__, cls.__name__, chain, chosen, x.tolist()


def test_the_plugin_is_found_by_name_and_by_the_dispatcher(vendor_plugin):
    for module, name, chain, chosen, values in run_ranks(_found_through_the_entry_point, 2,
                                                          start_method="spawn"):
        assert module == "distrib_vendor_example.communicator" and name == "ByteExchangeCommunicator"
        # In the default chain, after gloo (priority -10 < 0), so gloo keeps the CPU tensors.
        assert chain.index("gloo") < chain.index(vendor_plugin)
        assert chosen == vendor_plugin
        assert values == [3.0] * 6


def test_the_plugin_passes_the_conformance_suite(vendor_plugin):
    for report in launch_conformance(vendor_plugin, 2, start_method="spawn", timeout=240):
        assert report.communicator == vendor_plugin and not report.skipped and not report.declined
