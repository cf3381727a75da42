"""An installed wheel carries everything distrib reads at run time, the CUDA sources included."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_kernel_sources_where_the_custom_all_reduce_finds_them(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(REPO)],
                           capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("distrib-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in (REPO / "kernels").glob("*.cu*"):
        assert f"distrib/kernels/{source.name}" in names
    assert "distrib/py.typed" in names  # type checkers read distrib's hints only with it (PEP 561)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = subprocess.run(
        [sys.executable, "-c", "from distrib.communicator._custom_all_reduce import kernel_source_dir; "
                               "print(kernel_source_dir())"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == site / "distrib" / "kernels"
