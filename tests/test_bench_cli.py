"""``python -m distrib.bench``'s own command line, and what the benchmarks say when the plotting extra is missing.

- ``--help`` (exit 0) lists every registered benchmark with one line from its
  docstring, without importing torch; no name or an unknown one exits 2,
  naming the benchmarks;
- the all-reduce plot, without matplotlib, is skipped with one reason that
  names the ``bench`` extra.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from distrib.bench.__main__ import BENCHMARKS


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrib.bench", *args], capture_output=True, text=True,
                          timeout=60)


def _listed(text: str) -> dict[str, str]:
    lines = text.split("benchmarks:\n", 1)[1].splitlines()
    return {line.split()[0]: line.strip()[len(line.split()[0]):].strip() for line in lines if line.strip()}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_benchmark_with_what_it_measures(flag):
    result = _bench(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m distrib.bench <benchmark>")
    listed = _listed(result.stdout)
    assert list(listed) == list(BENCHMARKS)
    for name, line in listed.items():
        assert line and not line.startswith("python -m") and "``" not in line, (name, line)
    assert listed["allreduce"] == "The latency of one all-reduce, ours against the peers."


def test_the_listing_imports_no_benchmark_and_no_torch():
    code = ("import sys, io, contextlib\n"
            "from distrib.bench.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n"
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('distrib.bench.')]\n"
            "assert loaded == ['distrib.bench.__main__'], loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_no_name_or_an_unknown_name_exits_2_and_lists_the_benchmarks():
    missing = _bench()
    assert missing.returncode == 2 and "which benchmark?" in missing.stderr
    assert list(_listed(missing.stderr)) == list(BENCHMARKS)
    unknown = _bench("allreduc", "--smoke")
    assert unknown.returncode == 2
    assert f"unknown benchmark 'allreduc'; the benchmarks are {', '.join(BENCHMARKS)}." in unknown.stderr
    assert list(_listed(unknown.stderr)) == list(BENCHMARKS)


def test_without_matplotlib_the_plot_is_skipped_with_the_install_hint(monkeypatch, tmp_path):
    from distrib.bench import _report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    why_not = _report.plot({"meta": {}, "results": []}, tmp_path / "allreduce.png")
    assert why_not == "matplotlib is not installed (pip install 'distrib[bench]')"
    assert not (tmp_path / "allreduce.png").exists()
