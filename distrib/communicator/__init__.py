"""Communicators: tensor data between devices (all_reduce and friends).

The interface, the NCCL and gloo implementations and the dispatcher are
built in their own issue; this package marks the layer's place.
"""
__all__: list[str] = []
