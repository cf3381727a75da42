"""The control plane on pyzmq and msgpack: authenticated sockets and small messages.

- :mod:`._security`  every zmq socket distrib opens: CURVE keys derived from the
  launch's secret, so a process without the secret can neither connect nor read
- :mod:`.codec`      msgpack messages (never pickle), with size limits and tensor
  metadata
- :mod:`.stacks`     where each rank is: stack snapshots and their one-screen summary
- :mod:`.agent`      the worker side of a launcher's monitor: heartbeats, snapshots
- :mod:`.monitor`    the launcher side: who is alive, and where each rank is stuck
"""
