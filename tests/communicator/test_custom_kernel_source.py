"""The kernel source compiles with nvcc, and the host's view of its structs matches C++.

Runs on CPU machines with the CUDA compiler: a toolkit's nvcc on the PATH, or
the pip-installed one of the ``nvcc`` extra (``make test`` installs it, so CI
runs these). Nothing built here touches a GPU. Skipped, with the reason,
where nvcc is missing.
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from distrib.communicator import _custom_all_reduce as host
from distrib.communicator._cuda_driver import Norm
from distrib.communicator._custom_all_reduce import kernel_source_dir


def _nvcc():
    """nvcc on the PATH, else the one in the nvidia-cuda-nvcc wheel (nvidia/cu13/bin)."""
    found = shutil.which("nvcc")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "cu13" / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return None


NVCC = _nvcc()
# The runtime libraries beside a wheel's nvcc (a toolkit's nvcc knows its own).
LIBS = [f"-L{Path(NVCC).parents[1] / 'lib'}"] if NVCC and (Path(NVCC).parents[1] / "lib").is_dir() else []
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


# As built: by default, with fail-stop compiled out (to measure its cost), with a test's stall.
VARIANTS = {"default": [], "no-fail-stop": ["-DDISTRIB_FAIL_STOP=0"],
            "test-stall": ["-DDISTRIB_TEST_STALL_RANK=1", "-DDISTRIB_TEST_STALL_CALL=3",
                           "-DDISTRIB_TEST_STALL_NS=600000000ull"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kernel_instantiation_compiles_for_sm90a(tmp_path, variant):
    source = kernel_source_dir() / "custom_all_reduce.cu"
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90a", "-DDISTRIB_INSTANTIATE_ALL", *VARIANTS[variant],
         "-Werror", "all-warnings", "-c", str(source), "-o", str(tmp_path / "custom_all_reduce.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_no_float_instruction_flushes_subnormals(tmp_path):
    """CuPy compiles every NVRTC program with -ftz=true; the kernels' arithmetic keeps subnormals anyway.

    With plain `+` the reductions compiled to add.ftz.f32, and 2.9e-39 + 0.0 came back 0.0
    (float32 and bfloat16); the kernels now spell their float arithmetic out in PTX without .ftz.
    """
    source = kernel_source_dir() / "custom_all_reduce.cu"
    ptx = tmp_path / "custom_all_reduce.ptx"
    result = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-ftz=true", "-DDISTRIB_INSTANTIATE_ALL", "-ptx",
                             str(source), "-o", str(ptx)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert text.count(".entry") >= 72 and "add.rn.f32" in text and "sqrt.rn.f32" in text
    assert [line.strip() for line in text.splitlines() if ".ftz" in line] == []


LAYOUT_PROBE = r"""
#include <cstdio>
#include <cstddef>
#include "custom_all_reduce.cuh"
int main() {
  using namespace distrib;
  std::printf("%zu %zu %zu %zu %zu %zu %zu %d %d %zu %zu %zu %zu %zu\n", sizeof(Norm), offsetof(Norm, eps),
              sizeof(Signal),
              offsetof(Signal, p2p_check), sizeof(Context), sizeof(RankData),
              offsetof(Context, lamport), DISTRIB_MAX_BLOCKS, DISTRIB_LAMPORT_BLOCKS,
              offsetof(Signal, epoch), offsetof(Signal, lamport_calls), offsetof(Signal, lamport_copy),
              offsetof(Signal, poison), sizeof(ErrorRecord));
  return 0;
}
"""


def test_host_struct_layout_matches_the_kernel_headers(tmp_path):
    probe = tmp_path / "layout.cu"
    probe.write_text(LAYOUT_PROBE)
    exe = tmp_path / "layout"
    build = subprocess.run([NVCC, "-std=c++17", f"-I{kernel_source_dir()}", str(probe), "-o", str(exe), *LIBS],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (norm, norm_eps, signal, p2p_offset, context, rank_data, lamport_offset, max_blocks, lamport_blocks, epoch_offset,
     calls_offset, copy_offset, poison_offset, error_record) = map(
        int, subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split())
    assert (norm, norm_eps) == (ctypes.sizeof(Norm), Norm.eps.offset)  # passed by value to the fused kernels
    assert signal <= host.SIGNAL_BYTES and host.SIGNAL_BYTES % 16 == 0
    assert p2p_offset == host._P2P_CHECK_OFFSET
    assert context == struct.calcsize(host.CONTEXT_FORMAT)
    assert lamport_offset == struct.calcsize(host.CONTEXT_FORMAT) - 8 * host.MAX_RANKS
    assert rank_data == host.RANK_DATA_BYTES
    assert (max_blocks, lamport_blocks) == (host.MAX_BLOCKS, host.LAMPORT_BLOCKS)
    assert (epoch_offset, calls_offset, copy_offset, poison_offset) == (
        host._EPOCH_OFFSET, host._LAMPORT_CALLS_OFFSET, host._LAMPORT_COPY_OFFSET, host._POISON_OFFSET)
    assert error_record == 4 * host.ERROR_RECORD_WORDS
