"""``python -m distrib.bench <benchmark> [options]``; ``--help`` after a name lists its options."""
from __future__ import annotations

import sys

BENCHMARKS = {"allreduce": "distrib.bench.allreduce",
              "channel": "distrib.bench.channel",
              "custom-crossover": "distrib.bench.custom_crossover",
              "failstop": "distrib.bench.failstop",
              "faults": "distrib.bench.faults",
              "groups": "distrib.bench.groups",
              "kernel-ab": "distrib.bench.kernel_ab",
              "op-overhead": "distrib.bench.op_overhead"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(BENCHMARKS)
        print(f"usage: python -m distrib.bench {{{names}}} [options]  (then --help for its options)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from importlib import import_module

    return import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
