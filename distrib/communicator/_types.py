"""The value types of the communicator layer: reduce ops, dtypes, devices, collectives, tensor views.

The lowest module of the package: everything else imports it, it imports
nothing of the package. :mod:`.api` re-exports every name here.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple, Optional

from ..errors import ConfigError

__all__ = ["Collective", "DType", "DeviceType", "ReduceOp", "TensorView"]


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class ReduceOp(_StrEnum):
    """How ``all_reduce`` and ``reduce_scatter`` combine the ranks' values."""

    SUM = "sum"
    PROD = "prod"
    MAX = "max"
    MIN = "min"
    AVG = "avg"  # floating-point dtypes only: an integer average would truncate

    @classmethod
    def parse(cls, op: "ReduceOp | str") -> "ReduceOp":
        """``op`` as a ReduceOp; raises :class:`ConfigError` for an unknown name."""
        if op.__class__ is cls:
            return op
        member = cls._value2member_map_.get(op) if op.__class__ is str else None
        if member is not None:
            return member  # type: ignore[return-value]  # the names compiled graphs pass
        try:
            return cls(op.lower() if isinstance(op, str) else op)
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown reduce op {op!r}; expected one of: {known}") from None


class DType(_StrEnum):
    """Element types a communicator may support (names as in torch and NumPy)."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    INT8 = "int8"
    UINT8 = "uint8"
    INT32 = "int32"
    INT64 = "int64"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def is_floating_point(self) -> bool:
        return self in (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32, DType.FLOAT64)


_ITEMSIZE = {DType.FLOAT16: 2, DType.BFLOAT16: 2, DType.FLOAT32: 4, DType.FLOAT64: 8,
             DType.INT8: 1, DType.UINT8: 1, DType.INT32: 4, DType.INT64: 8}


class DeviceType(_StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


class Collective(_StrEnum):
    """The data calls of a communicator: collectives, and point-to-point sends and receives."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    BROADCAST = "broadcast"
    SEND = "send"
    RECV = "recv"

    @property
    def is_point_to_point(self) -> bool:
        return self is Collective.SEND or self is Collective.RECV


class TensorView(NamedTuple):
    """What a communicator needs to know about one caller's tensor, read once.

    ``obj`` is the caller's object (returned by the data calls); ``ptr`` the
    address of its first element; ``dtype`` is None when the element type is
    not a :class:`DType` (``dtype_name`` says what it is). ``tensor`` is a
    torch.Tensor over the same memory when there is one (always on the CPU).
    """

    obj: Any
    ptr: int
    numel: int
    shape: tuple
    dtype: Optional[DType]
    dtype_name: str
    device_type: str        # "cpu", "cuda", or whatever else the object lives on
    device_index: Optional[int]
    contiguous: bool
    library: str            # "torch", "cupy" or "cuda_array_interface"
    tensor: Any = None

    @property
    def nbytes(self) -> int:
        return self.numel * (self.dtype.itemsize if self.dtype is not None else 0)
