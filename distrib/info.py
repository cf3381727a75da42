"""LaunchInfo: what every launcher tells every process it starts.

The environment is the transport: a launcher calls :meth:`LaunchInfo.to_env`
for each process, the process calls :meth:`LaunchInfo.from_env`. Variable
names follow torchrun where torchrun has one, so a script that calls
``torch.distributed.init_process_group(init_method="env://")`` runs unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional

from .errors import ConfigError

__all__ = ["LaunchInfo", "ENV_VARS", "SHARE_GPU_VAR", "LOCAL_GPUS_VAR", "ranks_sharing_a_gpu",
           "members_sharing_a_gpu"]

# Set in every process of a launch whose ranks share GPUs (the launchers' share_gpu), to the
# most ranks of its node on one GPU: communicators that need a GPU per rank (NCCL) read it to
# stand aside, and the custom all-reduce to size its kernels for every rank on a GPU.
SHARE_GPU_VAR = "DISTRIB_SHARE_GPU"
# Beside it: the GPU of each local rank of the node, comma-separated ("0,0,1,1"), so that a
# group can tell whether its own members share one.
LOCAL_GPUS_VAR = "DISTRIB_LOCAL_GPUS"

# field name -> environment variable
ENV_VARS = {
    "launch_id": "DISTRIB_LAUNCH_ID",
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
    "node_rank": "NODE_RANK",
    "nnodes": "NNODES",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
    "secret": "DISTRIB_SECRET",
}


@dataclass(frozen=True)
class LaunchInfo:
    """The frozen record of one process's place in a launch."""

    launch_id: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    # Authenticates control traffic; never printed.
    secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank", "local_world_size",
                     "node_rank", "nnodes", "master_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"LaunchInfo.{name} must be an int, got {value!r}")
        if not self.launch_id:
            raise ConfigError("LaunchInfo.launch_id must be a non-empty string")
        _check(self.world_size >= 1, "WORLD_SIZE", self.world_size, "an integer >= 1")
        _check(0 <= self.rank < self.world_size, "RANK", self.rank,
               f"0 <= RANK < WORLD_SIZE={self.world_size}")
        _check(1 <= self.local_world_size <= self.world_size, "LOCAL_WORLD_SIZE",
               self.local_world_size, f"1 <= LOCAL_WORLD_SIZE <= WORLD_SIZE={self.world_size}")
        _check(0 <= self.local_rank < self.local_world_size, "LOCAL_RANK", self.local_rank,
               f"0 <= LOCAL_RANK < LOCAL_WORLD_SIZE={self.local_world_size}")
        _check(1 <= self.nnodes <= self.world_size, "NNODES", self.nnodes,
               f"1 <= NNODES <= WORLD_SIZE={self.world_size}")
        _check(0 <= self.node_rank < self.nnodes, "NODE_RANK", self.node_rank,
               f"0 <= NODE_RANK < NNODES={self.nnodes}")
        _check(1 <= self.master_port <= 65535, "MASTER_PORT", self.master_port,
               "a TCP port in 1..65535")
        _check(bool(self.master_addr), "MASTER_ADDR", self.master_addr,
               "a host name or address reachable from every node")

    # -- conveniences ------------------------------------------------------
    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def is_local_master(self) -> bool:
        return self.local_rank == 0

    def replace(self, **changes) -> "LaunchInfo":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LaunchInfo(**values)

    # -- environment transport ----------------------------------------------
    def to_env(self) -> dict[str, str]:
        """The variables a launcher sets for this process (torchrun's names too)."""
        env = {var: str(getattr(self, name)) for name, var in ENV_VARS.items()}
        env.update({
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.nnodes),
            "ROLE_RANK": str(self.rank),
            "ROLE_WORLD_SIZE": str(self.world_size),
            "TORCHELASTIC_RUN_ID": self.launch_id,
        })
        return env

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "LaunchInfo":
        """Build the record from ``environ`` (default: ``os.environ``).

        Raises :class:`ConfigError` naming the variable that is missing or
        inconsistent, and the value that was expected.
        """
        env = os.environ if environ is None else environ
        world_size = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_world_size = _int(env, "LOCAL_WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK")

        node_rank = _optional_int(env, "NODE_RANK")
        group_rank = _optional_int(env, "GROUP_RANK")
        if node_rank is not None and group_rank is not None and node_rank != group_rank:
            raise ConfigError(
                f"NODE_RANK={node_rank} and GROUP_RANK={group_rank} disagree; "
                "expected both to name the same node (set one, or make them equal)"
            )
        node_rank = node_rank if node_rank is not None else group_rank
        nnodes = _optional_int(env, "NNODES")
        if nnodes is None:
            nnodes = _optional_int(env, "GROUP_WORLD_SIZE")
        single_node = local_world_size == world_size
        if node_rank is None:
            if not single_node:
                raise ConfigError(
                    "NODE_RANK is not set, and LOCAL_WORLD_SIZE < WORLD_SIZE says there is "
                    "more than one node; expected NODE_RANK (or GROUP_RANK) = this node's index"
                )
            node_rank = 0
        if nnodes is None:
            if not single_node:
                raise ConfigError(
                    "NNODES is not set, and LOCAL_WORLD_SIZE < WORLD_SIZE says there is "
                    "more than one node; expected NNODES = the number of nodes"
                )
            nnodes = 1

        master_addr = _str(env, "MASTER_ADDR")
        master_port = _int(env, "MASTER_PORT")
        launch_id = env.get("DISTRIB_LAUNCH_ID") or env.get("TORCHELASTIC_RUN_ID")
        if not launch_id:
            # Started by something other than a distrib launcher (torchrun
            # without a run id, a hand-written script): the rendezvous
            # address names the launch.
            launch_id = f"{master_addr}:{master_port}"
        return cls(
            launch_id=launch_id,
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=node_rank,
            nnodes=nnodes,
            master_addr=master_addr,
            master_port=master_port,
            secret=env.get("DISTRIB_SECRET", ""),
        )


def ranks_sharing_a_gpu(environ: Optional[Mapping[str, str]] = None) -> int:
    """The most ranks of this node on one GPU, as the launcher said (``SHARE_GPU_VAR``); 1 if unset."""
    text = (os.environ if environ is None else environ).get(SHARE_GPU_VAR, "")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def members_sharing_a_gpu(info: "LaunchInfo", members, environ: Optional[Mapping[str, str]] = None) -> list:
    """Which of ``members`` (global ranks) share a GPU with another member, as the launcher said.

    Empty where ranks do not share GPUs. Members on other nodes never share one with this
    node's; this node's are its ``local_world_size`` consecutive ranks (as every distrib
    launcher places them). Without the launcher's map of GPUs, every member on this node
    counts as sharing.
    """
    env = os.environ if environ is None else environ
    if env.get(SHARE_GPU_VAR, "") in ("", "0"):
        return []
    first = info.rank - info.local_rank
    here = [r for r in members if first <= r < first + info.local_world_size]
    gpus = env.get(LOCAL_GPUS_VAR, "").split(",")
    if len(gpus) != info.local_world_size:
        return here if len(here) > 1 else []
    by_gpu: dict = {}
    for rank in here:
        by_gpu.setdefault(gpus[rank - first], []).append(rank)
    return sorted(r for ranks in by_gpu.values() if len(ranks) > 1 for r in ranks)


def _check(ok: bool, var: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{var}={value!r} is invalid; expected {expected}")


def _str(env: Mapping[str, str], var: str) -> str:
    value = env.get(var)
    if value is None or value == "":
        raise ConfigError(
            f"{var} is not set; expected it from the launcher (distrib.launch, distrib-run, "
            f"SLURM's srun or torchrun). Start this program through one of them, or set {var}."
        )
    return value


def _int(env: Mapping[str, str], var: str) -> int:
    text = _str(env, var)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{var}={text!r} is not an integer; expected an integer") from None


def _optional_int(env: Mapping[str, str], var: str) -> Optional[int]:
    if env.get(var) in (None, ""):
        return None
    return _int(env, var)
