"""``distrib-run``: the command-line launcher (not built yet).

Until it exists it says so and exits with status 2, rather than pretend to work.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    print("distrib-run is not implemented yet. From Python, use distrib.launch(fn, nprocs=N).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
