"""Shared test configuration.

GPU tests carry ``@pytest.mark.gpu``; they are deselected by default (see
pyproject's addopts) and skip cleanly where CUDA is missing when selected
with ``-m gpu``.
"""
from __future__ import annotations

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:  # so worker processes can import tests' helper modules
    sys.path.insert(0, TESTS_DIR)


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    if torch.version.cuda is None:
        return 0
    try:
        return torch.cuda.device_count()
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if _cuda_devices() == 0:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a CUDA build of torch")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture
def clean_env(monkeypatch):
    """Remove launch variables inherited from an outer launcher."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                "NNODES", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DISTRIB_LAUNCH_ID",
                "DISTRIB_SECRET", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
                "DISTRIB_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    for var in list(os.environ):
        if var.startswith("SLURM_"):
            monkeypatch.delenv(var, raising=False)
    return monkeypatch
