"""Algorithm-selection tables for the custom all-reduce, per world size.

How they were measured: ``python -m distrib.bench custom-crossover`` on the
named machine (one process per GPU, bf16 and fp32, CUDA-graph replay of 20
captured all-reduces, median of several replays), every algorithm of the
custom kernel and NCCL (through CuPy) in the same run. Its JSON output is
committed under ``benchmarks/results/``. Boundaries are the largest size at
which an algorithm was still the fastest; ``max_bytes`` is the largest size
at which the custom kernel (eager, staged) still beat NCCL.

Rows marked ``measured=False`` were not measured on any machine yet (only
2-GPU H200 machines were available when they were written); they follow
the shape of the measured rows and the published tables of other custom
all-reduce implementations, and should be re-measured before being trusted.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Table", "lookup", "ALGORITHMS"]

ALGORITHMS = ("lamport_one_shot", "one_shot", "two_shot")

KB, MB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Table:
    world_size: int
    lamport_max_bytes: int   # Lamport one-shot up to here ...
    one_shot_max_bytes: int  # ... then one-shot up to here, then two-shot
    max_bytes: int           # above this, NCCL is faster: the dispatcher sends it there
    max_blocks: int          # thread blocks of the one- and two-shot kernels (more: more bytes in flight)
    measured: bool
    source: str


_TABLES = {
    # 2x H200 (NV18): benchmarks/results/2xH200/custom-crossover-2xH200*.json.
    # With two ranks one-shot moves each byte once, so two-shot never wins;
    # 128 blocks beat 36 from 512 KB up (more bytes in flight over NVLink:
    # 4 MB one-shot 26.6 -> 20.5 us staged); custom beat NCCL up to 32 MB.
    2: Table(2, lamport_max_bytes=256 * KB, one_shot_max_bytes=64 * MB, max_bytes=32 * MB, max_blocks=128,
             measured=True, source="2x NVIDIA H200, 2026-11-23"),
    4: Table(4, lamport_max_bytes=64 * KB, one_shot_max_bytes=512 * KB, max_bytes=8 * MB, max_blocks=128,
             measured=False, source="not measured"),
    6: Table(6, lamport_max_bytes=32 * KB, one_shot_max_bytes=256 * KB, max_bytes=8 * MB, max_blocks=128,
             measured=False, source="not measured"),
    8: Table(8, lamport_max_bytes=32 * KB, one_shot_max_bytes=256 * KB, max_bytes=8 * MB, max_blocks=128,
             measured=False, source="not measured"),
}


def lookup(world_size: int, device_name: str = "") -> Table:
    """The table for ``world_size`` (the device name is kept for per-GPU tables later)."""
    return _TABLES[world_size]
