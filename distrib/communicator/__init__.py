"""Communicators: tensor data between devices (all_reduce and friends).

- :mod:`.api`        the interface: :class:`Communicator`, value types, the registry
- :mod:`.gloo`       gloo on CPU tensors
- :mod:`.nccl`       NCCL through CuPy on CUDA tensors
- :mod:`.custom`     the custom P2P all-reduce, where this tree has it
- :mod:`.dispatcher` :func:`create`: the one object users hold, trying the
  registered communicators in order and falling back down the chain

Typical use, in every rank::

    comm = distrib.communicator.create()   # custom > nccl > gloo, as available
    comm.all_reduce(tensor)                 # in place, on the current CUDA stream

The same calls work inside ``torch.compile``: they are traced as PyTorch
operators (``torch.ops.distrib.*``, registered by :mod:`._ops`).
"""
from importlib import import_module, util

from .api import Collective, Communicator, DeviceType, DType, ReduceOp, TensorView, communicators
from .dispatcher import Dispatcher, create

__all__ = ["Collective", "Communicator", "DType", "DeviceType", "Dispatcher", "ReduceOp",
           "TensorView", "communicators", "create"]

# The built-in implementations register themselves when imported; each
# imports its vendor library only when used, so importing them here is cheap.
# A module this tree lacks is skipped (found by name, so that an ImportError
# raised inside a module that does exist is not mistaken for its absence). A
# module that exists but fails to import must not take gloo and NCCL down with
# it: the failure is logged, and the dispatcher lists it as disabled.
_BUILTIN_MODULES = ("gloo", "nccl", "custom", "ipc")
for _name in _BUILTIN_MODULES:
    if util.find_spec(f"{__name__}.{_name}") is None:
        continue
    try:
        import_module(f"{__name__}.{_name}")
    except Exception as _exc:  # noqa: BLE001 — reported, not fatal
        if _name not in communicators:
            from .dispatcher import logger as _logger, not_imported as _not_imported

            _not_imported[_name] = f"its module failed to import: {type(_exc).__name__}: {_exc}"
            _logger.warning("communicator %r is unavailable: %s", _name, _not_imported[_name])
del _name
