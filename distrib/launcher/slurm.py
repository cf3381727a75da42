"""SLURM: each ``srun`` task configures itself; ``distrib-run --launcher slurm`` starts them.

Under ``srun`` every task is one rank. :func:`slurm_environment` (registered
in :data:`distrib.runtime.environment_sources`, so ``distrib.init()`` finds it
on its own) turns SLURM's variables into LaunchInfo's:

====================  ==================================================
RANK, WORLD_SIZE      SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS)
LOCAL_RANK            SLURM_LOCALID
LOCAL_WORLD_SIZE      this node's entry of SLURM_STEP_TASKS_PER_NODE
NODE_RANK, NNODES     SLURM_NODEID, SLURM_STEP_NUM_NODES (SLURM_NNODES)
MASTER_ADDR           first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST),
                      expanded with python-hostlist
MASTER_PORT           hashed from launch id (DISTRIB_LAUNCH_ID)
DISTRIB_LAUNCH_ID     ``slurm-<job id>.<step id>``: two steps of one job differ
DISTRIB_SECRET        made per step by ``distrib-run --launcher slurm`` and
                      passed in srun's environment; under a bare ``srun``,
                      export one yourself (the control plane needs it)
====================  ==================================================

Variables set explicitly win; where one contradicts SLURM (``RANK=3`` in a
task that SLURM calls 1), that is an error naming both. A process started by
a launcher (``distrib-run``, torchrun: ``DISTRIB_LAUNCH_ID`` or
``TORCHELASTIC_RUN_ID`` set) is left to that launcher's variables, because
inside an allocation it inherits SLURM's variables of the *launcher's* task.

Rank 0 hosts the rendezvous store (no launcher outlives the tasks), as a
multi-tenant server that ``init_process_group("env://")`` shares.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from typing import Mapping, Optional

from ..errors import ConfigError
from ..ports import port_for_launch_id
from ..runtime import environment_sources
from ._errorfile import ERROR_DIR_VAR
from ._secret import SECRET_VAR
from ._srun import SrunStep
from .api import Command, CommandLauncher, CommandOptions, launchers

__all__ = ["SlurmLauncher", "slurm_environment", "slurm_launch_id"]

# LaunchInfo variable -> the SLURM variables it comes from, first found wins.
_IDENTITY = {
    "RANK": ("SLURM_PROCID",),
    "WORLD_SIZE": ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
    "LOCAL_RANK": ("SLURM_LOCALID",),
    "NODE_RANK": ("SLURM_NODEID",),
    "NNODES": ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
}
_NODELIST = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
_TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
_LAUNCHER_MARKERS = ("DISTRIB_LAUNCH_ID", "TORCHELASTIC_RUN_ID")


def slurm_launch_id(environ: Mapping[str, str]) -> str:
    """``slurm-<job id>.<step id>``: unique per job step, the same in every task of it."""
    return f"slurm-{environ['SLURM_JOB_ID']}.{environ['SLURM_STEP_ID']}"


def slurm_environment(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
    """The LaunchInfo variables an ``srun`` task's environment implies, or ``None``.

    ``None`` outside an srun task, and in a process whose launcher set the
    variables itself. Raises :class:`ConfigError` when an explicit variable
    contradicts SLURM's, naming both.
    """
    if not (environ.get("SLURM_JOB_ID") and environ.get("SLURM_STEP_ID")
            and environ.get("SLURM_PROCID")):
        return None  # not a task of an srun step (a batch script, salloc's shell, no SLURM)
    if any(environ.get(marker) for marker in _LAUNCHER_MARKERS):
        return None
    detected: dict[str, str] = {}
    source_of: dict[str, str] = {}
    for var, names in _IDENTITY.items():
        name = _first_present(environ, names)
        if name is not None:
            detected[var], source_of[var] = environ[name], name
    missing = [names[0] for var, names in _IDENTITY.items() if var not in detected]
    nodelist_var = _first_present(environ, _NODELIST)
    if nodelist_var is None:
        missing.append(_NODELIST[0])
    if missing or nodelist_var is None:
        raise ConfigError(
            f"this looks like an srun task (SLURM_JOB_ID, SLURM_STEP_ID and SLURM_PROCID are set), "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; expected srun "
            "to set them. Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and "
            "MASTER_PORT yourself, or run the task through srun.")
    hosts = _expand(environ[nodelist_var], nodelist_var)
    detected["LOCAL_WORLD_SIZE"], source_of["LOCAL_WORLD_SIZE"] = _local_world_size(
        environ, int(detected["NODE_RANK"]), int(detected["WORLD_SIZE"]), len(hosts))
    launch_id = slurm_launch_id(environ)
    detected["MASTER_ADDR"], source_of["MASTER_ADDR"] = hosts[0], f"the first host of {nodelist_var}"
    detected["MASTER_PORT"] = str(port_for_launch_id(launch_id))
    detected["DISTRIB_LAUNCH_ID"] = launch_id
    _check_conflicts(environ, detected, source_of)
    return detected


def _first_present(environ: Mapping[str, str], names) -> Optional[str]:
    return next((n for n in names if environ.get(n) not in (None, "")), None)


def _expand(nodelist: str, var: str) -> list[str]:
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise ConfigError(f"{var}={nodelist!r} is not a valid SLURM host list: {exc}") from None
    if not hosts:
        raise ConfigError(f"{var}={nodelist!r} names no host; expected at least one")
    return hosts


def _local_world_size(environ: Mapping[str, str], node_rank: int, world_size: int,
                      nnodes: int) -> tuple[str, str]:
    import hostlist

    var = _first_present(environ, _TASKS_PER_NODE)
    if var is not None:
        try:
            counts = hostlist.parse_slurm_tasks_per_node(environ[var])
        except Exception:
            raise ConfigError(f"{var}={environ[var]!r} is not SLURM's tasks-per-node form "
                              "(like '2(x3),1')") from None
        if node_rank < len(counts):
            return str(counts[node_rank]), var
    if nnodes == 1:
        return str(world_size), "SLURM_NTASKS on one node"
    raise ConfigError(f"cannot tell how many tasks run on node {node_rank}: "
                      f"{' and '.join(_TASKS_PER_NODE)} are not set; expected srun to set them")


def _check_conflicts(environ: Mapping[str, str], detected: Mapping[str, str],
                     source_of: Mapping[str, str]) -> None:
    """Identity variables set explicitly must agree with SLURM (choices like MASTER_PORT may differ)."""
    aliases = {"NODE_RANK": ("NODE_RANK", "GROUP_RANK"), "NNODES": ("NNODES", "GROUP_WORLD_SIZE")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "NNODES"):
        for name in aliases.get(var, (var,)):
            explicit = environ.get(name)
            if explicit not in (None, "") and explicit.strip() != detected[var]:
                raise ConfigError(
                    f"{name}={explicit} is set explicitly, but SLURM says {var}={detected[var]} "
                    f"({source_of[var]}={environ.get(source_of[var], detected[var])}); expected them "
                    f"to agree. Unset {name} to use SLURM's value, or launch outside srun.")


if slurm_environment not in environment_sources:
    environment_sources.append(slurm_environment)


# -- distrib-run --launcher slurm ---------------------------------------------------

@launchers.register("slurm")
class SlurmLauncher(CommandLauncher):
    """Starts one task per rank through ``srun``, from inside a SLURM allocation.

    ``nprocs`` is tasks per node (``None``: as the allocation says) and
    ``options.nnodes`` the node count. Output, log files, the rank filter
    and the failure summary behave as with the subprocess launcher;
    tracebacks of failed tasks come from error records written into
    ``options.log_dir`` (or a temporary folder, seen only on this node
    unless it is on a shared file system).
    """

    name = "slurm"

    def __init__(self, stdout=None, stderr=None, srun: str = "srun"):
        self._stdout = stdout
        self._stderr = stderr
        self._srun = srun

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if shutil.which("srun") is None:
            return "srun is not on PATH; install SLURM's client or use --launcher subprocess"
        if not os.environ.get("SLURM_JOB_ID"):
            return ("not inside a SLURM allocation (SLURM_JOB_ID is not set); run it under "
                    "salloc or sbatch")
        return None

    def run(self, target: Command, nprocs: Optional[int],
            options: CommandOptions = CommandOptions()) -> list[int]:
        argv = self.srun_argv(target, nprocs, options)
        error_dir = options.log_dir or tempfile.mkdtemp(prefix="distrib-slurm-")
        os.makedirs(error_dir, exist_ok=True)
        env = {**os.environ, **options.env, ERROR_DIR_VAR: os.path.abspath(error_dir),
               "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
        if options.master_port is not None:
            env["MASTER_PORT"] = str(options.master_port)
        if options.master_addr:
            env["MASTER_ADDR"] = options.master_addr
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "NNODES",
                     "GROUP_RANK", "GROUP_WORLD_SIZE", "DISTRIB_LAUNCH_ID", "TORCHELASTIC_RUN_ID"):
            env.pop(name, None)  # our own launcher's, if distrib-run itself runs inside one
        if nprocs is None or nprocs > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
        if not env.get(SECRET_VAR):
            # One secret per job step, handed to every task in srun's environment (never
            # through the store); a DISTRIB_SECRET the user exported is kept.
            env[SECRET_VAR] = secrets.token_hex(32)
        try:
            return SrunStep(argv, env, options, error_dir, self._stdout or sys.stdout.buffer,
                             self._stderr or sys.stderr.buffer).run()
        finally:
            if not options.log_dir:
                shutil.rmtree(error_dir, ignore_errors=True)

    def srun_argv(self, target: Command, nprocs: Optional[int], options: CommandOptions) -> list[str]:
        """The srun command line for ``target`` (raises ConfigError for options SLURM decides)."""
        if options.node_rank not in (None, 0):
            raise ConfigError("--node-rank is not used with --launcher slurm: srun places the tasks")
        if options.max_restarts:
            raise ConfigError("--max-restarts is not supported with --launcher slurm: a failed task ends "
                              "the step (srun --kill-on-bad-exit); resubmit it, or use sbatch --requeue")
        if options.redirects or options.local_ranks_filter is not None:
            raise ConfigError("--redirects and --local-ranks-filter are not used with --launcher slurm; "
                              "use --show-ranks and --log-dir")
        if options.launch_id:
            raise ConfigError("--launch-id is not used with --launcher slurm: it is derived from "
                              "the job and step ids")
        if options.devices is not None:
            raise ConfigError("--devices is not used with --launcher slurm: ask srun for GPUs "
                              "(--gpus-per-task, --gres) and SLURM sets CUDA_VISIBLE_DEVICES")
        if nprocs is not None and (not isinstance(nprocs, int) or nprocs < 1):
            raise ConfigError(f"nprocs={nprocs!r} is invalid; expected an integer >= 1 or auto")
        argv = [self._srun, "--label", "--kill-on-bad-exit=1", "--unbuffered"]
        if options.nnodes > 1 or nprocs is not None:
            argv.append(f"--nodes={options.nnodes}")
        if nprocs is not None:
            argv.append(f"--ntasks-per-node={nprocs}")
            argv.append(f"--ntasks={nprocs * options.nnodes}")
        return argv + target.bootstrap_argv()
