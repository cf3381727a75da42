"""distrib's type hints check: mypy passes over distrib/ with the settings in pyproject.toml."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]')")
@pytest.mark.timeout(240)
def test_mypy_passes_over_the_package():
    # Files, modules and settings come from [tool.mypy]; the cache in .mypy_cache makes
    # a repeated run take a second or two (a cold one, about 15 s on two cores).
    checked = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")],
                             capture_output=True, text=True, cwd=str(REPO), timeout=220)
    assert checked.returncode == 0, f"mypy found errors:\n{checked.stdout}{checked.stderr}"
