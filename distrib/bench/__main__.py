"""``python -m distrib.bench <benchmark> [options]``; ``--help`` after a name lists its options.

``python -m distrib.bench --help`` (or no name) lists the benchmarks, each with
the first line of its module's docstring, read from the source without
importing it (the benchmarks import torch; the listing stays fast). Exit
status: 0 for ``--help``, 2 for a missing or unknown name, else the
benchmark's own.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tokenize
from typing import Optional, Sequence, TextIO

__all__ = ["BENCHMARKS", "describe", "main"]

BENCHMARKS = {"allreduce": "distrib.bench.allreduce",
              "channel": "distrib.bench.channel",
              "custom-crossover": "distrib.bench.custom_crossover",
              "failstop": "distrib.bench.failstop",
              "faults": "distrib.bench.faults",
              "groups": "distrib.bench.groups",
              "kernel-ab": "distrib.bench.kernel_ab",
              "op-overhead": "distrib.bench.op_overhead"}

USAGE = "usage: python -m distrib.bench <benchmark> [options]   (<benchmark> --help lists its options)"

# A docstring's first line may start by repeating the command ("``python -m distrib.bench groups``: ...").
_COMMAND = re.compile(r"^``python -m distrib\.bench [\w-]+``:\s*")


def describe(module: str) -> str:
    """What the benchmark in ``module`` measures: its docstring's first line, read without importing it."""
    spec = importlib.util.find_spec(module)  # imports the parent package (already imported), not the module
    doc = ""
    if spec is not None and spec.origin is not None:
        with open(spec.origin, "rb") as source:  # the docstring is the first token: read no further
            for token in tokenize.tokenize(source.readline):
                if token.type == tokenize.STRING:
                    doc = ast.literal_eval(token.string)
                if token.type not in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL):
                    break
    first = _COMMAND.sub("", doc.strip().split("\n", 1)[0]).replace("``", "").strip()
    return first[:1].upper() + first[1:] if first else "(no description)"


def _listing(stream: TextIO) -> None:
    width = max(map(len, BENCHMARKS))
    print(USAGE, "", "benchmarks:", file=stream, sep="\n")
    for name, module in BENCHMARKS.items():
        print(f"  {name:<{width}}  {describe(module)}", file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        _listing(sys.stdout)
        return 0
    if not argv:
        print("python -m distrib.bench: which benchmark? Name one.", file=sys.stderr)
        _listing(sys.stderr)
        return 2
    if argv[0] not in BENCHMARKS:
        print(f"python -m distrib.bench: unknown benchmark {argv[0]!r}; the benchmarks are "
              f"{', '.join(BENCHMARKS)}.", file=sys.stderr)
        _listing(sys.stderr)
        return 2
    from importlib import import_module

    return import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
