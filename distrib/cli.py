"""``distrib-run``: run a Python program as many cooperating processes.

::

    distrib-run --nprocs 4 train.py --lr 3e-4
    distrib-run --nprocs auto -m mypkg.serve          # one per visible GPU, else per CPU
    distrib-run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nprocs 8 serve.py
    distrib-run --launcher slurm --nprocs 4 train.py  # inside a SLURM allocation, through srun

Every worker gets its LaunchInfo (and torchrun's variable names) in its
environment. The exit status is the root-cause rank's; after a signal it is
128 + the signal's number. Launchers come from the ``launchers`` registry,
so every registered command launcher is a ``--launcher`` choice.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import ConfigError, DistribError, WorkerFailedError
from .launcher import launchers
from .launcher._devices import parse_devices
from .launcher._process import freeze_for_exit
from .launcher._report import exit_code_of, failure_summary
from .launcher.api import Command, CommandLauncher, CommandOptions, LaunchInterrupted

__all__ = ["main", "console_main", "build_parser", "parse_ranks"]


def command_launcher_names() -> list[str]:
    """Registered launchers that run commands (the valid ``--launcher`` values)."""
    names = []
    for name in launchers.names():
        try:
            cls = launchers.get(name)
        except ConfigError:
            continue
        if isinstance(cls, type) and issubclass(cls, CommandLauncher):
            names.append(name)
    return sorted(names)


def parse_ranks(text: str) -> frozenset[int]:
    """``"0,2-3"`` -> ``{0, 2, 3}``."""
    ranks: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            first, last = int(low), int(high) if high else int(low)
            if first < 0 or last < first:
                raise ValueError
            ranks.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"--show-ranks {text!r} is invalid; expected ranks like 0 or 0,2-3") from None
    if not ranks:
        raise ConfigError(f"--show-ranks {text!r} names no rank; expected ranks like 0 or 0,2-3")
    return frozenset(ranks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrib-run",
        description="Run a Python program as many cooperating processes, one per rank. Each line "
                    "a rank prints is prefixed with [rank]. The exit status is the root-cause rank's.")
    parser.add_argument("--launcher", default="subprocess", metavar="NAME",
                        help="how to start the processes: "
                             f"{', '.join(command_launcher_names())} (default: subprocess)")
    parser.add_argument("--nprocs", "--nproc-per-node", "--nproc_per_node", default="1",
                        metavar="N|auto",
                        help="processes per node; auto: one per visible GPU, else one per CPU "
                             "(with --launcher slurm: as the allocation says). Default 1. "
                             "OMP_NUM_THREADS defaults to 1 when N > 1.")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--node-rank", "--node_rank", type=int, default=0,
                        help="this node's index, 0 <= node rank < nnodes (default 0)")
    parser.add_argument("--master-addr", "--master_addr", default=None,
                        help="address of node 0, reachable from every node (default: 127.0.0.1 "
                             "on one node; required for several)")
    parser.add_argument("--master-port", "--master_port", type=int, default=None,
                        help="rendezvous port on node 0 (default: derived from the launch id)")
    parser.add_argument("--launch-id", default=None,
                        help="names the launch; the same on every node (default: fresh, or "
                             "MASTER_ADDR:MASTER_PORT on several nodes)")
    parser.add_argument("--devices", default=None, metavar="0,2|cpu",
                        help="GPUs to use, one per process (default: GPU i for local rank i when "
                             "GPUs are visible); cpu: none")
    parser.add_argument("--share-gpu", action="store_true",
                        help="let ranks share GPUs: --devices may repeat one (0,0,0,0), and without "
                             "--devices the ranks are spread over the visible GPUs. For developing "
                             "multi-GPU code on one GPU; ranks on a shared GPU run under MPS")
    parser.add_argument("--log-dir", default=None,
                        help="also write each rank's output to DIR/rank<N>.log (and the failure "
                             "record of a failed rank to DIR/rank<N>.error.json)")
    parser.add_argument("--show-ranks", default=None, metavar="RANKS",
                        help="show only these ranks' output on the console, e.g. 0 or 0,2-3 "
                             "(log files still get every rank)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when stopping workers (default 5)")
    parser.add_argument("--rdzv-timeout", type=float, default=300.0,
                        help="seconds nodes wait for each other (default 300)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the launch after this many seconds, printing where each rank "
                             "was (default: no limit)")
    parser.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
                        help="report a rank (with its stacks) after this long without a heartbeat "
                             "(default 5). Send SIGUSR1 to distrib-run to see where every rank is")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="run the program as a module (python -m NAME)")
    parser.add_argument("program", help="the script (or, with -m, the module) to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    return parser


def options_from(args: argparse.Namespace) -> tuple[Command, Optional[int], CommandOptions]:
    """The command, processes per node (``None``: auto) and options that ``args`` describe."""
    if args.nprocs == "auto":
        nprocs: Optional[int] = None
    else:
        try:
            nprocs = int(args.nprocs)
        except ValueError:
            raise ConfigError(f"--nprocs {args.nprocs!r} is invalid; expected an integer >= 1 or "
                              "auto") from None
    command = Command(program=args.program, args=tuple(args.args), module=args.module)
    options = CommandOptions(
        nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
        master_port=args.master_port, launch_id=args.launch_id,
        devices=None if args.devices is None else parse_devices(args.devices),
        share_gpu=args.share_gpu, log_dir=args.log_dir,
        show_ranks=None if args.show_ranks is None else parse_ranks(args.show_ranks),
        grace=args.grace, rdzv_timeout=args.rdzv_timeout, timeout=args.timeout,
        heartbeat_timeout=args.heartbeat_timeout)
    return command, nprocs, options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``distrib-run`` with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command, nprocs, options = options_from(args)
        launcher_cls = launchers.get(args.launcher)
        if not (isinstance(launcher_cls, type) and issubclass(launcher_cls, CommandLauncher)):
            raise ConfigError(
                f"launcher {args.launcher!r} runs Python callables, not programs; distrib-run can "
                f"use: {', '.join(command_launcher_names())}")
        reason = launcher_cls.unavailable_reason()
        if reason:
            raise ConfigError(f"launcher {args.launcher!r} cannot run here: {reason}")
        launcher_cls().run(command, nprocs, options)
        return 0
    except WorkerFailedError as exc:
        print(failure_summary(exc), file=sys.stderr, flush=True)
        return exit_code_of(exc.root_cause)
    except LaunchInterrupted as exc:
        print(f"distrib-run: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except ConfigError as exc:
        print(f"distrib-run: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except DistribError as exc:
        print(f"distrib-run: error: {exc}", file=sys.stderr, flush=True)
        return 1


def console_main() -> None:
    """The ``distrib-run`` program: :func:`main` on the command line, then exit with its status."""
    code = main()
    # Every worker is reaped and everything the launch owned is closed by now; what is
    # left is the interpreter's teardown, with torch loaded for the store.
    freeze_for_exit()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
