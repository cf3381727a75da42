"""The IPC send/recv kernels compile with nvcc, and the host's view of their structs matches C++.

Like test_custom_kernel_source.py: CPU machines with the CUDA compiler (the
``nvcc`` extra that ``make test`` installs), no GPU; skipped where nvcc is missing.
"""
from __future__ import annotations

import struct
import subprocess

import pytest

from distrib.communicator import _ipc_send_recv as host
from distrib.communicator._ipc import kernel_source_dir
from test_custom_kernel_source import LIBS, NVCC

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


def test_the_send_recv_kernels_compile_for_sm90a_without_warnings(tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90a", "-Werror", "all-warnings", "-c",
         str(kernel_source_dir() / "ipc_send_recv.cu"), "-o", str(tmp_path / "ipc_send_recv.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


PROBE = r"""
#include <cstdio>
#include <cstddef>
#include "ipc_send_recv.cuh"
int main() {
  using namespace distrib::ipc;
  unsigned long long sizes[] = {256, 4096, 4097, 65536, 100000, 1ull << 20, (1ull << 20) + 3, 123456789};
  std::printf("%zu %zu %zu %zu %zu %zu %zu %zu %d %d %d %d %d\n", sizeof(Mailbox),
              offsetof(Mailbox, ready), offsetof(Mailbox, freed), offsetof(Mailbox, sent),
              offsetof(Mailbox, taken), offsetof(Mailbox, p2p_check), offsetof(Mailbox, poison),
              sizeof(IpcContext), kMaxRanks, kLanes, kDepth, (int)kMinChunk, kHeaderBytes);
  for (unsigned long long n : sizes) std::printf("%llu ", chunk_size(n, 65536));
  std::printf("\n");
  return 0;
}
"""


def test_host_layout_and_chunking_match_the_kernel_header(tmp_path):
    probe = tmp_path / "probe.cu"
    probe.write_text(PROBE)
    exe = tmp_path / "probe"
    build = subprocess.run([NVCC, "-std=c++17", f"-I{kernel_source_dir()}", str(probe), "-o", str(exe), *LIBS],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    first, second = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    (mailbox, ready, freed, sent, taken, p2p_check, poison, context, max_ranks, lanes, depth, min_chunk,
     header) = map(int, first.split())
    assert mailbox <= host.MAILBOX_BYTES and host.MAILBOX_BYTES % 16 == 0
    assert (ready, freed, sent, taken) == (host.READY_OFFSET, host.FREED_OFFSET, host.SENT_OFFSET,
                                           host.TAKEN_OFFSET)
    assert (p2p_check, poison) == (host.P2P_CHECK_OFFSET, host.POISON_OFFSET)
    assert context == struct.calcsize(host.CONTEXT_FORMAT)
    assert (max_ranks, lanes, depth, min_chunk, header) == (host.MAX_RANKS, host.LANES, host.DEPTH,
                                                            host.MIN_CHUNK, host.HEADER_BYTES)
    sizes = [256, 4096, 4097, 65536, 100000, 1 << 20, (1 << 20) + 3, 123456789]
    assert [int(c) for c in second.split()] == [host.chunk_size(n, 65536) for n in sizes]
