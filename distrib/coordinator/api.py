"""The Coordinator interface: small control messages between processes.

A Coordinator moves bytes, not tensors: barriers, a broadcast from one rank,
an all-gather. Every blocking call takes a timeout, and a timeout names the
ranks that never arrived. Typical use, once per node::

    if coord.is_local_master():
        prepare_node()        # download, create directories ...
    coord.barrier()
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Optional

from ..info import LaunchInfo
from ..registry import Registry

if TYPE_CHECKING:
    from ..control.channel import BroadcastChannel

__all__ = ["Coordinator", "coordinators", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300.0  # seconds; DISTRIB_COORDINATOR_TIMEOUT overrides


class Coordinator(ABC):
    """Control-plane operations among the processes of one launch.

    Every process of the launch calls the collective methods (``broadcast``,
    ``all_gather``, ``barrier``) in the same order; ``local_barrier`` is
    called by every process of one node. ``timeout=None`` uses the
    coordinator's default.
    """

    name: ClassVar[str] = "abstract"

    def __init__(self, info: LaunchInfo):
        self.info = info

    # -- identity ---------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def local_rank(self) -> int:
        return self.info.local_rank

    @property
    def local_world_size(self) -> int:
        return self.info.local_world_size

    @property
    def node_rank(self) -> int:
        return self.info.node_rank

    def is_master(self) -> bool:
        """True on global rank 0."""
        return self.info.rank == 0

    def is_local_master(self) -> bool:
        """True on local rank 0 of each node."""
        return self.info.local_rank == 0

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

    @abstractmethod
    def close(self) -> None:
        """Release sockets and threads. Idempotent; not a collective."""

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


coordinators: Registry[type[Coordinator]] = Registry("coordinator", "distrib.coordinators")
