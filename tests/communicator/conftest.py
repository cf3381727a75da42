"""Fixtures for the communicator tests (helpers for workers: communicator_support.py)."""
from __future__ import annotations

import importlib.metadata
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENDOR_PLUGIN = REPO / "examples" / "vendor_plugin"


def _plugin_installed() -> bool:
    return any(ep.name == "vendor_example"
               for ep in importlib.metadata.entry_points(group="distrib.communicators"))


@pytest.fixture(scope="session")
def vendor_plugin() -> str:
    """The example vendor plug-in, installed (editable) into this environment if it is not yet.

    Worker processes started afterwards with the spawn method find it through
    its entry point; this process re-reads site-packages so that spawned
    workers inherit a sys.path that includes it.
    """
    if not _plugin_installed():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-e", str(VENDOR_PLUGIN)],
            capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"could not install {VENDOR_PLUGIN}:\n{result.stdout}\n{result.stderr}")
        site.addsitedir(sysconfig.get_paths()["purelib"])  # process the new .pth file here too
        importlib.invalidate_caches()
    assert _plugin_installed(), "the vendor plug-in's entry point is not visible after installing it"
    return "vendor_example"
