"""The control plane on pyzmq and msgpack: authenticated sockets and small messages.

- :mod:`.channel`    the broadcast channel a Coordinator hands out: one writer,
  many readers (a shared-memory ring on a node, zmq across nodes)
- :mod:`.codec`      msgpack messages (never pickle), with size limits and tensor
  metadata
- :mod:`._security`  every zmq socket distrib opens: CURVE keys derived from the
  launch's secret, so a process without the secret can neither connect nor read
- :mod:`.stacks`     where each rank is: stack snapshots and their one-screen summary
- :mod:`.agent`      the worker side of a launcher's monitor: heartbeats, snapshots
- :mod:`.monitor`    the launcher side: who is alive, and where each rank is stuck
"""
from .channel import BroadcastChannel, ChannelClosed
from .codec import MessageError, TensorMeta

__all__ = ["BroadcastChannel", "ChannelClosed", "MessageError", "TensorMeta"]
