"""Inputs and expected results for the conformance suite, in any array library.

Every rank can compute every other rank's input, so each rank computes the
expected result itself (in float64 on the CPU). Values are small integers, so
sum, max, min and prod are exact in every dtype, bfloat16 included; avg is
checked with a tolerance of the dtype's precision.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..communicator.api import DType, ReduceOp

TORCH_DTYPES = {DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16,
                DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64,
                DType.INT8: torch.int8, DType.UINT8: torch.uint8,
                DType.INT32: torch.int32, DType.INT64: torch.int64}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
AVG_TOLERANCE = {DType.FLOAT16: 1e-3, DType.BFLOAT16: 1e-2, DType.FLOAT32: 1e-6, DType.FLOAT64: 1e-12}


def pattern(op: ReduceOp, rank: int, world_size: int, numel: int, dtype: DType) -> torch.Tensor:
    """Rank ``rank``'s input for ``op`` (float64, flat): small integers chosen so
    that the reduction is exact in ``dtype`` for any world size up to 8."""
    i = torch.arange(numel, dtype=torch.float64)
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        return (i * 7 + rank * 3) % 5 + 1                     # 1..5; a sum is at most 40
    if op in (ReduceOp.MAX, ReduceOp.MIN):
        values = (i * 7 + rank * 3) % 9
        return values if dtype is DType.UINT8 else values - 4
    values = torch.where((i + rank) % world_size == 0, 2.0, 1.0)  # one rank brings the 2
    if dtype is not DType.UINT8:
        values = torch.where((i + 2 * rank) % 5 == 0, -values, values)
    return values


def expected(op: ReduceOp, world_size: int, numel: int, dtype: DType) -> torch.Tensor:
    inputs = torch.stack([pattern(op, r, world_size, numel, dtype) for r in range(world_size)])
    if op is ReduceOp.SUM:
        return inputs.sum(0)
    if op is ReduceOp.AVG:
        return inputs.sum(0) / world_size
    if op is ReduceOp.PROD:
        return inputs.prod(0)
    return inputs.amax(0) if op is ReduceOp.MAX else inputs.amin(0)


class Library:
    """Makes arrays of one library on one device and reads them back as CPU torch tensors.

    ``name``: "torch", "cupy", or "cuda_array_interface" (a bare object that
    exposes only ``__cuda_array_interface__``, to test the generic path).
    """

    def __init__(self, name: str, device: Optional[int]):
        if name not in ("torch", "cupy", "cuda_array_interface"):
            raise ValueError(f"library={name!r}; expected 'torch', 'cupy' or 'cuda_array_interface'")
        if name != "torch" and device is None:
            raise ValueError(f"library={name!r} needs a CUDA device")
        self.name = name
        self.device = device
        self.torch_device = torch.device("cpu") if device is None else torch.device("cuda", device)

    def unsupported_reason(self, dtype: DType) -> Optional[str]:
        """Why this library cannot hold ``dtype``, or None."""
        if dtype is DType.BFLOAT16 and self.name == "cuda_array_interface":
            return "__cuda_array_interface__ has no bfloat16 type"
        if dtype is DType.BFLOAT16 and self.name == "cupy":
            try:
                import cupy

                cupy.zeros(2, dtype=cupy.int16).view(self.cupy_dtype(dtype))
            except ImportError:
                return "CuPy needs ml_dtypes for bfloat16"
            except Exception as exc:  # noqa: BLE001 — this CuPy has no bfloat16 yet
                return f"this CuPy cannot hold bfloat16 ({type(exc).__name__}: {exc})"
        return None

    def make(self, values: torch.Tensor, shape: tuple, dtype: DType) -> Any:
        """An array of ``shape`` and ``dtype`` holding ``values`` (float64, flat)."""
        tensor = values.to(TORCH_DTYPES[dtype]).reshape(shape)
        if self.name == "torch":
            return tensor.to(self.torch_device)
        if self.name == "cuda_array_interface":
            return InterfaceOnly(tensor.to(self.torch_device))
        import cupy

        raw = tensor.reshape(-1).view(_SAME_SIZE_INT[tensor.element_size()]).numpy()
        with cupy.cuda.Device(self.device):
            return cupy.asarray(raw).view(self.cupy_dtype(dtype)).reshape(shape)

    def empty(self, shape: tuple, dtype: DType) -> Any:
        return self.make(torch.zeros(shape_numel(shape), dtype=torch.float64), shape, dtype)

    def to_torch(self, array: Any) -> torch.Tensor:
        """A CPU torch tensor with ``array``'s values (synchronises with its device)."""
        if isinstance(array, torch.Tensor):
            return array.cpu()
        if isinstance(array, InterfaceOnly):
            return array.tensor.cpu()
        import cupy

        dtype = DType(array.dtype.name)
        size = array.dtype.itemsize
        flat = array.reshape(-1).view(cupy.dtype(f"i{size}") if size > 1 else cupy.uint8)
        host = torch.from_numpy(cupy.asnumpy(flat))  # int16/32/64 or uint8: same bytes
        return host.view(TORCH_DTYPES[dtype]).reshape(array.shape)

    def cupy_dtype(self, dtype: DType):
        import cupy

        if dtype is DType.BFLOAT16:
            import ml_dtypes

            return cupy.dtype(ml_dtypes.bfloat16)
        return cupy.dtype(dtype.value)

    def non_contiguous(self, dtype: DType) -> Any:
        array = self.make(torch.ones(24, dtype=torch.float64), (4, 6), dtype)
        if self.name == "torch":
            return array.t()
        if self.name == "cuda_array_interface":
            return InterfaceOnly(array.tensor.t())
        return array.T


class InterfaceOnly:
    """A CUDA array known only through ``__cuda_array_interface__`` (over a torch tensor)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.__cuda_array_interface__ = tensor.__cuda_array_interface__


def shape_numel(shape: tuple) -> int:
    n = 1
    for extent in shape:
        n *= extent
    return n
