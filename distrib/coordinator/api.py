"""The Coordinator interface: small control messages between processes.

A Coordinator moves bytes, not tensors: barriers, a broadcast from one rank,
an all-gather. Every blocking call takes a timeout, and a timeout names the
ranks that never arrived. Typical use, once per node::

    if coord.is_local_master():
        prepare_node()        # download, create directories ...
    coord.barrier()
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterable, Optional, Sequence, Union

from .._text import format_ranks
from ..errors import ConfigError, CoordinatorError
from ..info import LaunchInfo
from ..registry import Registry

if TYPE_CHECKING:
    from ..control.channel import BroadcastChannel

__all__ = ["Coordinator", "GroupSpec", "coordinators", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300.0  # seconds; DISTRIB_COORDINATOR_TIMEOUT overrides


@dataclass(frozen=True)
class GroupSpec:
    """Which ranks of the launch a Coordinator spans.

    ``ranks`` holds the global rank of each member, in group-rank order;
    ``key`` is unique in the launch and the same on every member (it names
    the group's keys in the rendezvous store); ``name`` is for messages
    ("" when the group has none).
    """

    name: str
    key: str
    ranks: tuple

    @classmethod
    def world(cls, world_size: int) -> "GroupSpec":
        return cls("world", "world", tuple(range(world_size)))


class Coordinator(ABC):
    """Control-plane operations among the processes of one launch, or of a group of them.

    Every member calls the collective methods (``broadcast``, ``all_gather``,
    ``barrier``) in the same order; ``local_barrier`` is called by every
    member on one node. ``timeout=None`` uses the coordinator's default.

    A Coordinator spans the whole launch (what ``distrib.init()`` returns) or
    a group of its ranks (:meth:`group`, :meth:`split`). Its ``rank``,
    ``world_size``, ``local_rank``, ``local_world_size``, ``node_rank`` and
    ``nnodes`` are the group's own (``node_rank`` counts the nodes that hold
    members); ``ranks`` maps a group rank to its global rank, and every error
    names global ranks. Anything built on a Coordinator (a Communicator, a
    broadcast channel) works on a group unchanged, among its members only.
    """

    name: ClassVar[str] = "abstract"

    def __init__(self, info: LaunchInfo, group: Optional[GroupSpec] = None):
        self.info = info
        self.spec = group if group is not None else GroupSpec.world(info.world_size)
        self._children: list["Coordinator"] = []
        self._groups_made: dict[tuple, int] = {}  # global ranks -> groups made with them here
        if group is None:
            self.rank, self.world_size = info.rank, info.world_size
            self.local_rank, self.local_world_size = info.local_rank, info.local_world_size
            self.node_rank, self.nnodes = info.node_rank, info.nnodes
        else:
            if info.rank not in group.ranks:
                raise CoordinatorError(f"rank {info.rank} is not a member of {group.name} "
                                       f"(ranks {format_ranks(group.ranks)})")
            self.rank, self.world_size = group.ranks.index(info.rank), len(group.ranks)
            self._place([0] * self.world_size)  # one node until the implementation knows better

    def _place(self, nodes: Sequence[int]) -> None:
        """Set the node-relative identity from the launch node of every member (group order)."""
        mine = nodes[self.rank]
        local = [r for r, node in enumerate(nodes) if node == mine]
        distinct = sorted(set(nodes))
        self.local_rank, self.local_world_size = local.index(self.rank), len(local)
        self.node_rank, self.nnodes = distinct.index(mine), len(distinct)

    # -- identity ---------------------------------------------------------
    @property
    def ranks(self) -> tuple:
        """The global rank of each member, indexed by group rank (the world: 0 .. N-1)."""
        return self.spec.ranks

    @property
    def global_rank(self) -> int:
        """This process's rank in the launch."""
        return self.info.rank

    @property
    def is_world(self) -> bool:
        """Whether this Coordinator spans the whole launch rather than a group of it."""
        return self.spec.key == "world"

    def is_master(self) -> bool:
        """True on rank 0 of this coordinator (global rank 0 for the whole launch)."""
        return self.rank == 0

    def is_local_master(self) -> bool:
        """True on the first member of each node (local rank 0)."""
        return self.local_rank == 0

    def describe(self) -> str:
        """What this coordinator spans, for messages: "the launch" or "group tp (ranks 4-5)"."""
        if self.is_world:
            return "the launch"
        if not self.spec.name:
            return f"group of ranks {format_ranks(self.ranks)}"
        return f"group {self.spec.name} (ranks {format_ranks(self.ranks)})"

    def global_ranks(self, ranks: Iterable[int]) -> list:
        """The global ranks of these group ranks."""
        return [self.spec.ranks[r] for r in ranks]

    # -- groups -----------------------------------------------------------
    def group(self, ranks: Sequence[int], *, name: Optional[str] = None,
              timeout: Optional[float] = None) -> Optional["Coordinator"]:
        """A Coordinator for ``ranks`` (ranks of this coordinator), or None where this rank is not one.

        As torch's ``new_group``: every rank may call it with the same
        ``ranks``; the members get a Coordinator whose rank ``i`` is
        ``ranks[i]``, the others None at once. Only the members meet (so a
        late rank outside the group never holds the group back), and they
        must create their groups of the same ranks in the same order.
        ``name`` is for messages (and must be the same on every member);
        ``timeout`` bounds the group's start-up and is its default for
        blocking calls (default: this coordinator's). A member that never
        arrives is named, by global rank, when ``timeout`` expires.
        """
        members = _check_members(ranks, self.world_size)
        if self.rank not in members:
            return None
        return self._make_group(members, name, timeout)

    def split(self, color: Optional[Union[int, str]], key: Optional[int] = None, *,
              name: Optional[str] = None, timeout: Optional[float] = None) -> Optional["Coordinator"]:
        """MPI_Comm_split: the ranks that pass the same ``color`` form a group.

        Collective over this coordinator (every rank calls it; one
        all-gather). Members are ordered by ``key`` (default: their rank
        here), ties by rank. ``color=None`` takes no part and gets None.
        A bad ``color`` or ``key`` on any rank raises on every rank.
        """
        problem = None
        if color is not None and (isinstance(color, bool) or not isinstance(color, (int, str))):
            problem = f"color={color!r} must be an int, a str or None"
        elif key is not None and (isinstance(key, bool) or not isinstance(key, int)):
            problem = f"key={key!r} must be an int or None"
        mine = json.dumps({"color": None if problem else color,
                           "key": self.rank if key is None else key, "error": problem}).encode()
        replies = [json.loads(r) for r in self.all_gather(mine, timeout=timeout)]
        bad = {self.spec.ranks[r]: reply["error"] for r, reply in enumerate(replies) if reply["error"]}
        if bad:
            raise ConfigError("split: " + "; ".join(f"rank {r}: {e}" for r, e in bad.items()))
        if color is None:
            return None
        members = sorted((r for r, reply in enumerate(replies) if reply["color"] == color),
                         key=lambda r: (replies[r]["key"], r))
        return self._make_group(tuple(members), name if name is not None else f"color {color}", timeout)

    def _make_group(self, members: tuple, name: Optional[str], timeout: Optional[float]) -> "Coordinator":
        global_ranks = tuple(self.spec.ranks[r] for r in members)
        count = self._groups_made.get(global_ranks, 0)
        self._groups_made[global_ranks] = count + 1
        digest = hashlib.sha256(json.dumps(global_ranks).encode()).hexdigest()[:12]
        spec = GroupSpec(name or "", f"{self.spec.key}/{digest}.{count}", global_ranks)
        child = self._new_group(spec, timeout)
        self._children.append(child)
        return child

    def _new_group(self, spec: GroupSpec, timeout: Optional[float]) -> "Coordinator":
        """Start the Coordinator of ``spec`` on this member (its members only meet).

        Implementations that support groups override it; it must leave ranks
        outside ``spec.ranks`` alone, and name missing members by global rank.
        """
        raise CoordinatorError(f"groups are not supported by the {self.name} coordinator")

    # -- operations -------------------------------------------------------
    @abstractmethod
    def broadcast(self, data: bytes, src: int = 0, timeout: Optional[float] = None) -> bytes:
        """Return rank ``src``'s ``data`` on every rank (others' ``data`` is ignored)."""

    @abstractmethod
    def all_gather(self, data: bytes, timeout: Optional[float] = None) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank."""

    @abstractmethod
    def barrier(self, timeout: Optional[float] = None) -> None:
        """Block until every rank has called ``barrier``."""

    @abstractmethod
    def local_barrier(self, timeout: Optional[float] = None) -> None:
        """Block until every rank of this node has called ``local_barrier``."""

    def send(self, data: bytes, dst: int, timeout: Optional[float] = None) -> None:
        """Send ``data`` to rank ``dst`` alone, who takes it with :meth:`recv` (messages between
        two ranks arrive in order). Optional: coordinators without it raise CoordinatorError."""
        raise CoordinatorError(f"send is not supported by the {self.name} coordinator")

    def recv(self, src: int, timeout: Optional[float] = None) -> bytes:
        """The next message rank ``src`` sent to this rank with :meth:`send`."""
        raise CoordinatorError(f"recv is not supported by the {self.name} coordinator")

    def broadcast_channel(self, src: int = 0, *, chunk_bytes: int = 64 << 10, chunks: int = 16,
                          timeout: Optional[float] = None) -> "BroadcastChannel":
        """A channel on which rank ``src`` sends small messages to every other rank, fast.

        Collective: every rank calls it, in the same order, with the same
        arguments. Readers on ``src``'s node read a shared-memory ring of
        ``chunks`` x ``chunk_bytes`` (larger messages stream through it);
        readers on other nodes a zmq subscription authenticated by the launch
        secret. ``timeout`` bounds creation and is the default for each send
        and recv (``None``: this coordinator's default). Built from
        ``broadcast`` and ``all_gather``, so every Coordinator has it; if any
        rank cannot set up its end, every rank raises. See
        :class:`distrib.control.channel.BroadcastChannel`.
        """
        from ..control.channel import BroadcastChannel

        return BroadcastChannel.create(self, src, chunk_bytes=chunk_bytes, chunks=chunks,
                                       timeout=timeout)

    def close(self) -> None:
        """Release sockets and threads, this coordinator's groups' too. Idempotent; not a collective."""
        children, self._children = self._children, []
        for child in children:
            child.close()
        self._close()

    @abstractmethod
    def _close(self) -> None:
        """Release this coordinator's own sockets and threads (called by :meth:`close`)."""

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


coordinators: Registry[type[Coordinator]] = Registry("coordinator", "distrib.coordinators")


def _check_members(ranks: Sequence[int], world_size: int) -> tuple:
    """``ranks`` as a tuple, or a ConfigError: empty, not ints, duplicates, out of range."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
        raise ConfigError(f"group ranks={ranks!r} must be a list of ranks")
    members = tuple(ranks)
    if not members:
        raise ConfigError("group ranks=[] is empty; a group needs at least one rank")
    wrong = [r for r in members if isinstance(r, bool) or not isinstance(r, int)]
    if wrong:
        raise ConfigError(f"group ranks={list(members)!r} holds {wrong[0]!r}, which is not an int rank")
    outside = [r for r in members if not 0 <= r < world_size]
    if outside:
        raise ConfigError(f"group ranks={list(members)!r}: {outside[0]} is out of range; expected "
                          f"0 <= rank < {world_size}")
    seen: set[int] = set()
    twice = []
    for r in members:
        if r in seen:
            twice.append(r)
        seen.add(r)
    if twice:
        raise ConfigError(f"group ranks={list(members)!r} names rank {twice[0]} twice")
    return members
