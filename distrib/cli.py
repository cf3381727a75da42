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
import dataclasses
import os
import sys
import tempfile
from typing import Mapping, Optional, Sequence

from .errors import ConfigError, DistribError, WorkerFailedError
from .launcher import launchers
from .launcher._devices import parse_devices
from .launcher._process import freeze_for_exit
from .launcher._report import exit_code_of, failure_summary
from .launcher.api import Command, CommandLauncher, CommandOptions, LaunchInterrupted, StreamSpec

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


def parse_ranks(text: str, option: str = "--show-ranks") -> frozenset[int]:
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
        raise ConfigError(f"{option} {text!r} is invalid; expected ranks like 0 or 0,2-3") from None
    if not ranks:
        raise ConfigError(f"{option} {text!r} names no rank; expected ranks like 0 or 0,2-3")
    return frozenset(ranks)


# torchrun reads each option's default from PET_<DEST> (a Kubeflow PyTorchJob sets them):
# distrib-run does too, for the options torchrun has.
TORCHRUN_OPTIONS = ("nnodes", "nproc_per_node", "node_rank", "master_addr", "master_port",
                    "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_conf", "standalone",
                    "local_addr", "max_restarts", "monitor_interval", "start_method", "role",
                    "log_dir", "redirects", "tee", "local_ranks_filter", "module", "no_python",
                    "run_path")
RDZV_DEFAULT_PORT = 29400  # torchrun's, for an --rdzv-endpoint without a port


def build_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """distrib-run's parser; ``environ`` (default ``os.environ``) gives torchrun's PET_* defaults."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="distrib-run",
        description="Run a Python program as many cooperating processes, one per rank. Each line "
                    "a rank prints is prefixed with [rank]. The exit status is the root-cause rank's.",
        epilog="torchrun's options are accepted as torchrun spells them (--nproc_per_node, "
               "--rdzv-endpoint, ...), and each of them takes its default from torchrun's "
               "environment variable PET_<OPTION> (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, "
               "PET_MASTER_ADDR, PET_MASTER_PORT, ...), so a job written for torchrun runs unchanged.")
    add = parser.add_argument
    add("--version", action="version", version=f"distrib-run (distrib {__version__})")
    add("--launcher", default="subprocess", metavar="NAME",
        help=f"how to start the processes: {', '.join(command_launcher_names())} (default: subprocess)")
    add("--nprocs", "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", default="1",
        metavar="N|auto",
        help="processes per node; auto: one per visible GPU, else one per CPU (with --launcher "
             "slurm: as the allocation says). Default 1. OMP_NUM_THREADS defaults to 1 when N > 1.")
    add("--nnodes", default="1", metavar="N",
        help="number of nodes (default 1); torchrun's MIN:MAX is accepted as a fixed count N:N only")
    add("--node-rank", "--node_rank", type=int, default=None,
        help="this node's index, 0 <= node rank < nnodes (default 0 on one node). On several nodes "
             "without it, the nodes number themselves as they join: the one that hosts the "
             "rendezvous (--rdzv-endpoint, --master-addr) is node 0")
    add("--master-addr", "--master_addr", default=None,
        help="address of node 0, reachable from every node (default: 127.0.0.1 on one node; "
             "required for several, here or as --rdzv-endpoint)")
    add("--master-port", "--master_port", type=int, default=None,
        help="rendezvous port on node 0 (default: derived from the launch id)")
    add("--rdzv-endpoint", "--rdzv_endpoint", default=None, metavar="HOST[:PORT]",
        help="torchrun's rendezvous endpoint: node 0's address and port (--master-addr, "
             f"--master-port; port {RDZV_DEFAULT_PORT} if none is given)")
    add("--rdzv-backend", "--rdzv_backend", default="static", metavar="static|c10d",
        help="torchrun's rendezvous backend: static and c10d both mean distrib's own rendezvous "
             "in node 0's store (etcd is not supported)")
    add("--rdzv-id", "--rdzv_id", default=None, metavar="ID",
        help="torchrun's run id: names the launch (--launch-id)")
    add("--rdzv-conf", "--rdzv_conf", default="", metavar="KEY=VALUE,...",
        help="torchrun's rendezvous settings: join_timeout is --rdzv-timeout; the others are "
             "accepted and have no effect")
    add("--standalone", action="store_true",
        help="torchrun's single-node launch with a fresh rendezvous on this host: what "
             "distrib-run does on one node anyway")
    add("--local-addr", "--local_addr", default=None, metavar="ADDR",
        help="this node's address on the nodes' network: the rendezvous and control sockets "
             "listen there (DISTRIB_BIND_ADDR), and the node whose address is the endpoint's "
             "hosts the rendezvous")
    add("--launch-id", default=None,
        help="names the launch; the same on every node (default: fresh, or MASTER_ADDR:MASTER_PORT "
             "on several nodes)")
    add("--max-restarts", "--max_restarts", type=int, default=0, metavar="N",
        help="when a rank fails, stop every rank and start them all again, up to N times, with a "
             "fresh rendezvous (TORCHELASTIC_RESTART_COUNT counts the attempts); every node restarts "
             "together. Ctrl-C and SIGTERM never restart. Default 0")
    add("--devices", default=None, metavar="0,2|cpu",
        help="GPUs to use, one per process (default: GPU i for local rank i when GPUs are "
             "visible); cpu: none")
    add("--share-gpu", action="store_true",
        help="let ranks share GPUs: --devices may repeat one (0,0,0,0), and without --devices the "
             "ranks are spread over the visible GPUs. For developing multi-GPU code on one GPU; "
             "ranks on a shared GPU run under MPS")
    add("--log-dir", "--log_dir", default=None,
        help="also write each rank's output to DIR/rank<N>.log (and the failure record of a failed "
             "rank to DIR/rank<N>.error.json)")
    add("--redirects", "-r", default=None, metavar="STREAMS",
        help="torchrun's: keep these streams off the console, in the log files only (--log-dir, "
             "else a temporary folder, printed): 0 none, 1 stdout, 2 stderr, 3 both; for every "
             "local rank (3) or per local rank (0:3,1:2)")
    add("--tee", "-t", default=None, metavar="STREAMS",
        help="torchrun's: also write these streams to log files (format as --redirects); "
             "distrib-run writes both streams of every rank there (--log-dir, else a temporary "
             "folder, printed)")
    add("--show-ranks", default=None, metavar="RANKS",
        help="show only these ranks' output on the console, e.g. 0 or 0,2-3 (log files still get "
             "every rank)")
    add("--local-ranks-filter", "--local_ranks_filter", default=None, metavar="LOCAL_RANKS",
        help="torchrun's: show only these local ranks' output on the console (on one node, the "
             "same as --show-ranks)")
    add("--grace", type=float, default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping workers (default 5)")
    add("--rdzv-timeout", type=float, default=300.0,
        help="seconds nodes wait for each other (default 300)")
    add("--timeout", type=float, default=None,
        help="stop the launch after this many seconds, printing where each rank was (default: "
             "no limit)")
    add("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
        help="report a rank (with its stacks) after this long without a heartbeat (default 5); on "
             "several nodes, a node silent for this long plus 3 s is lost. Send SIGUSR1 to distrib-run "
             "to see where every rank is")
    add("--monitor-interval", "--monitor_interval", type=float, default=None, metavar="SECONDS",
        help="accepted for torchrun's sake: distrib-run looks at its workers every 20 ms")
    add("--start-method", "--start_method", default="spawn", choices=("spawn", "fork", "forkserver"),
        help="accepted for torchrun's sake: every rank is a fresh interpreter (spawn)")
    add("--role", default="default", help="torchrun's role name, given to workers as ROLE_NAME")
    add("-m", "--module", dest="module", action="store_true",
        help="run the program as a module (python -m NAME)")
    add("--no-python", "--no_python", action="store_true",
        help="run the program directly, not with python (a shell script, a binary); it gets the "
             "same environment")
    add("--run-path", "--run_path", action="store_true",
        help="torchrun's: run the script with runpy.run_path; distrib-run always runs scripts so, "
             "in a fresh interpreter per rank")
    add("program", help="the script (or, with -m, the module) to run")
    rest = add("args", nargs=argparse.REMAINDER, help="arguments for the program")
    rest.required = False  # only the program is required
    _torchrun_environment(parser, os.environ if environ is None else environ)
    return parser


def _torchrun_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Defaults from torchrun's PET_<DEST> variables (a flag from a true value)."""
    for action in parser._actions:
        name = f"PET_{action.dest.upper()}"
        if action.dest not in TORCHRUN_OPTIONS or name not in environ:
            continue
        value = environ[name]
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            action.default = value  # a string default goes through the option's type, as typed


def parse_nnodes(text: str) -> int:
    """``"2"`` or torchrun's fixed range ``"2:2"`` -> 2."""
    low, sep, high = str(text).partition(":")
    try:
        first, last = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ConfigError(f"--nnodes {text!r} is invalid; expected an integer N >= 1 (or N:N)") from None
    if first != last:
        raise ConfigError(f"--nnodes {text}: elastic node counts (MIN:MAX) are not supported, fixed "
                          f"node count only; pass --nnodes {last} (or {last}:{last})")
    if first < 1:
        raise ConfigError(f"--nnodes {text!r} is invalid; expected an integer >= 1")
    return first


def parse_endpoint(text: str) -> tuple[str, int]:
    """torchrun's ``HOST[:PORT]`` (``[IPv6]:PORT`` too) -> (host, port)."""
    host, port = text.strip(), str(RDZV_DEFAULT_PORT)
    if host.startswith("["):
        inside, _, rest = host[1:].partition("]")
        host, port = inside, rest[1:] if rest.startswith(":") else port
    elif host.count(":") == 1:
        host, port = host.split(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--rdzv-endpoint {text!r} is invalid; expected HOST or HOST:PORT")
    return host, int(port)


def parse_streams(text: Optional[str], option: str) -> StreamSpec:
    """torchrun's ``3`` or ``0:3,1:2`` (bits: 1 stdout, 2 stderr) -> StreamSpec."""
    if text is None or text == "":
        return StreamSpec()
    try:
        if ":" not in text:
            every = int(text)
            if not 0 <= every <= 3:
                raise ValueError
            return StreamSpec(every=every)
        per_rank = {}
        for part in text.split(","):
            rank, _, bits = part.partition(":")
            value = int(bits)
            if int(rank) < 0 or not 0 <= value <= 3:
                raise ValueError
            per_rank[int(rank)] = value
        return StreamSpec(per_rank=per_rank)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is invalid; expected 0-3 (1 stdout, 2 stderr, 3 both) or "
                          "LOCAL_RANK:STREAMS pairs like 0:3,1:2") from None


def options_from(args: argparse.Namespace) -> tuple[Command, Optional[int], CommandOptions]:
    """The command, processes per node (``None``: auto) and options that ``args`` describe."""
    if args.nproc_per_node == "auto":
        nprocs: Optional[int] = None
    else:
        try:
            nprocs = int(args.nproc_per_node)
        except ValueError:
            raise ConfigError(f"--nprocs {args.nproc_per_node!r} is invalid; expected an integer >= 1 "
                              "or auto") from None
    nnodes = parse_nnodes(args.nnodes)
    if args.standalone and nnodes != 1:
        raise ConfigError(f"--standalone is a launch on one node, but --nnodes is {nnodes}")
    if args.rdzv_backend not in ("static", "c10d"):
        raise ConfigError(f"--rdzv-backend {args.rdzv_backend!r} is not supported; use static or c10d "
                          "(both mean distrib's rendezvous in node 0's store)")
    master_addr, master_port = args.master_addr, args.master_port
    if args.rdzv_endpoint and not args.standalone:
        host, port = parse_endpoint(args.rdzv_endpoint)
        for name, given, value in (("--master-addr", master_addr, host), ("--master-port", master_port, port)):
            if given is not None and given != value:
                raise ConfigError(f"{name} {given} and --rdzv-endpoint {args.rdzv_endpoint} disagree; "
                                  "give one of them")
        master_addr, master_port = host, port
    rdzv_timeout = args.rdzv_timeout
    for item in filter(None, (p.strip() for p in args.rdzv_conf.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--rdzv-conf {args.rdzv_conf!r} is invalid; expected KEY=VALUE,...")
        if key.strip() == "join_timeout":
            rdzv_timeout = float(value)
    if args.show_ranks is not None and args.local_ranks_filter is not None:
        raise ConfigError("--show-ranks and --local-ranks-filter both choose what the console shows; "
                          "give one of them")
    if args.module and args.no_python:
        raise ConfigError("-m/--module and --no-python contradict each other: a module runs with python")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} is invalid; expected an integer >= 0")
    command = Command(program=args.program, args=tuple(args.args), module=args.module,
                      no_python=args.no_python)
    env = {} if args.role == "default" else {"ROLE_NAME": args.role}
    options = CommandOptions(
        nnodes=nnodes, node_rank=args.node_rank if args.node_rank is not None or nnodes > 1 else 0,
        master_addr=master_addr, master_port=master_port, launch_id=args.launch_id or args.rdzv_id,
        devices=None if args.devices is None else parse_devices(args.devices),
        share_gpu=args.share_gpu, log_dir=args.log_dir,
        show_ranks=None if args.show_ranks is None else parse_ranks(args.show_ranks),
        grace=args.grace, rdzv_timeout=rdzv_timeout, timeout=args.timeout,
        heartbeat_timeout=args.heartbeat_timeout, env=env, max_restarts=args.max_restarts,
        local_addr=args.local_addr, redirects=parse_streams(args.redirects, "--redirects"),
        local_ranks_filter=(None if args.local_ranks_filter is None
                            else parse_ranks(args.local_ranks_filter, "--local-ranks-filter")))
    parse_streams(args.tee, "--tee")  # checked; distrib-run logs both streams of every rank
    return command, nprocs, options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``distrib-run`` with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command, nprocs, options = options_from(args)
        if (options.redirects or args.tee) and not options.log_dir:
            options = dataclasses.replace(options, log_dir=tempfile.mkdtemp(prefix="distrib-run-logs-"))
            print(f"distrib-run: the ranks' log files go to {options.log_dir}", file=sys.stderr, flush=True)
        names = command_launcher_names()
        if args.launcher not in names:
            kind = ("runs Python callables (distrib.launch), not programs" if args.launcher in launchers.names()
                    else "is unknown")
            raise ConfigError(f"launcher {args.launcher!r} {kind}; distrib-run can use: {', '.join(names)}")
        launcher_cls = launchers.get(args.launcher)
        assert issubclass(launcher_cls, CommandLauncher)  # command_launcher_names() holds only these
        reason = launcher_cls.unavailable_reason()
        if reason:
            raise ConfigError(f"launcher {args.launcher!r} cannot run here: {reason}")
        check_program(command)
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


def check_program(command: Command) -> None:
    """A script that is missing or does not compile is one error here, not one per rank.

    Modules and executables (``-m``, ``--no-python``) are found by the workers' own
    environment; only a missing executable file is caught here.
    """
    if command.module:
        return
    path = command.program
    if command.no_python:
        if os.sep in path and not os.path.exists(path):
            raise ConfigError(f"the program {path} does not exist")
        return
    if not os.path.exists(path):
        raise ConfigError(f"the script {path} does not exist (to run a module, use -m NAME)")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "__main__.py")):
            return
        raise ConfigError(f"{path} is a directory without __main__.py; pass a script")
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.lineno else path
        detail = f"\n    {exc.text.rstrip()}" if exc.text else ""
        raise ConfigError(f"the script does not compile ({where}): {exc.msg}{detail}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the script {path} cannot be read: {exc}") from None


def console_main() -> None:
    """The ``distrib-run`` program: :func:`main` on the command line, then exit with its status."""
    code = main()
    # Every worker is reaped and everything the launch owned is closed by now; what is
    # left is the interpreter's teardown, with torch loaded for the store.
    freeze_for_exit()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
