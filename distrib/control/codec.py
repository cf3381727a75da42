"""Control messages: msgpack, never pickle.

A message is what msgpack carries: None, bools, numbers, strings, bytes, and
lists and dicts of them (tuples arrive as lists). A tensor in a message is
sent as its :class:`TensorMeta` (dtype, shape, device), never its data: the
receiver allocates and the data goes through a Communicator.

:func:`decode` is the only way bytes from a socket or shared memory become
objects; anything malformed, truncated or over the size limit raises
:class:`MessageError`, which receivers log and drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import DistribError

__all__ = ["TensorMeta", "MessageError", "encode", "decode"]

_TENSOR_META = 1  # msgpack extension type code


class MessageError(DistribError):
    """A message could not be encoded, or bytes received are not a valid message."""


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate a tensor: dtype name, shape, device."""

    dtype: str            # "float32", "bfloat16", ... (torch's name without "torch.")
    shape: tuple[int, ...]
    device: str           # "cpu", "cuda:0", ...

    @classmethod
    def of(cls, tensor: Any) -> "TensorMeta":
        return cls(dtype=str(tensor.dtype).removeprefix("torch."), shape=tuple(int(n) for n in tensor.shape),
                   device=str(tensor.device))


def _is_tensor(obj: Any) -> bool:
    kind = type(obj)
    return kind.__module__.startswith("torch") and kind.__name__ in ("Tensor", "Parameter")


def _default(obj: Any) -> Any:
    if _is_tensor(obj):
        obj = TensorMeta.of(obj)
    if isinstance(obj, TensorMeta):
        return msgpack.ExtType(_TENSOR_META, msgpack.packb([obj.dtype, list(obj.shape), obj.device]))
    raise TypeError(f"a control message cannot carry {type(obj).__name__}; send bytes, numbers, "
                    "strings, lists, dicts or tensors' metadata")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _TENSOR_META:
        raise MessageError(f"unknown msgpack extension type {code}")
    fields = msgpack.unpackb(data, raw=False)
    if (not isinstance(fields, list) or len(fields) != 3 or not isinstance(fields[0], str)
            or not isinstance(fields[1], list) or not all(isinstance(n, int) for n in fields[1])
            or not isinstance(fields[2], str)):
        raise MessageError("malformed tensor metadata")
    return TensorMeta(fields[0], tuple(fields[1]), fields[2])


def encode(obj: Any) -> bytes:
    """``obj`` as msgpack bytes; raises :class:`MessageError` for what a message cannot carry."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MessageError(str(exc)) from exc


def decode(data: bytes, max_bytes: int = 1 << 30) -> Any:
    """The message in ``data``; raises :class:`MessageError` if it is not exactly one valid message."""
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        # unpackb's limits follow the input's size: a short frame cannot declare a huge array.
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)
    except MessageError:
        raise
    except Exception as exc:  # msgpack raises several types for bad input
        raise MessageError(f"not a valid message ({type(exc).__name__}: {exc})") from exc
