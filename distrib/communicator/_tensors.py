"""Reading callers' tensors: adaptation, the common checks, outputs, streams.

Everything here runs on every data call, so it stays cheap: attribute reads,
dictionary look-ups, no device synchronisation and no imports of libraries
the caller has not imported already (torch and CuPy are found in
``sys.modules``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from ..errors import CommunicatorError, ConfigError
from ._types import Collective, DeviceType, DType, ReduceOp, TensorView

_TORCH_DTYPES: dict = {}  # torch.dtype -> DType, filled on first use


def as_view(obj: Any) -> TensorView:
    """A :class:`TensorView` of a torch tensor, CuPy array, CUDA array or DLPack object."""
    if obj.__class__ is TensorView:
        return obj
    loaded_torch = sys.modules.get("torch")  # not imported here: a CuPy caller may not need it
    if loaded_torch is not None and isinstance(obj, loaded_torch.Tensor):
        return _torch_view(obj, obj, "torch")
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return _cupy_view(obj)
    interface = getattr(obj, "__cuda_array_interface__", None)
    if interface is not None:
        return _interface_view(obj, interface)
    if hasattr(obj, "__dlpack__"):
        import torch

        try:
            tensor = torch.from_dlpack(obj)  # zero copy
        except Exception as exc:  # noqa: BLE001 — the exporter's own complaint is the message
            raise CommunicatorError(f"could not read the {type(obj).__name__} through DLPack: {exc}") from exc
        return _torch_view(tensor, obj, "torch")
    raise CommunicatorError(
        f"expected a torch tensor or a CuPy array (anything with __cuda_array_interface__ or "
        f"__dlpack__), got {type(obj).__name__}")


def shape_view(tensor) -> TensorView:
    """A view of a torch tensor's metadata only (``ptr`` 0): for tensors without memory,
    such as the fake tensors torch.compile traces with."""
    return _torch_view(tensor, tensor, "torch", ptr=0)


def _torch_view(tensor, obj, library: str, ptr: Optional[int] = None) -> TensorView:
    if not _TORCH_DTYPES:
        _fill_torch_dtypes()
    device = tensor.device
    dtype = _TORCH_DTYPES.get(tensor.dtype)
    return TensorView(obj, tensor.data_ptr() if ptr is None else ptr, tensor.numel(),
                      tuple(tensor.shape), dtype, dtype.value if dtype is not None else str(tensor.dtype).replace("torch.", ""),
                      device.type, device.index, tensor.is_contiguous(), library, tensor)


def _fill_torch_dtypes() -> None:
    import torch

    _TORCH_DTYPES.update({torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16,
                          torch.float32: DType.FLOAT32, torch.float64: DType.FLOAT64,
                          torch.int8: DType.INT8, torch.uint8: DType.UINT8,
                          torch.int32: DType.INT32, torch.int64: DType.INT64})


def _cupy_view(array) -> TensorView:
    name = array.dtype.name  # "bfloat16" when CuPy has ml_dtypes
    dtype = _DTYPE_NAMES.get(name)
    return TensorView(array, array.data.ptr, array.size, tuple(array.shape), dtype, name,
                      "cuda", array.device.id, array.flags.c_contiguous, "cupy")


_DTYPE_NAMES = {d.value: d for d in DType}
# __cuda_array_interface__ type strings; bfloat16 has none (it reads as "<V2").
_TYPESTRS = {"<f2": DType.FLOAT16, "<f4": DType.FLOAT32, "<f8": DType.FLOAT64, "|i1": DType.INT8,
             "|u1": DType.UINT8, "<i4": DType.INT32, "<i8": DType.INT64}


def _interface_view(obj, interface: dict) -> TensorView:
    shape = tuple(interface["shape"])
    typestr = interface["typestr"]
    dtype = _TYPESTRS.get(typestr)
    numel = 1
    for extent in shape:
        numel *= extent
    ptr = interface["data"][0]
    strides = interface.get("strides")
    contiguous = strides is None or numel <= 1 or tuple(strides) == _c_strides(shape, int(typestr[2:]))
    return TensorView(obj, ptr, numel, shape, dtype, dtype.value if dtype else _typestr_name(typestr),
                      "cuda", _device_of_pointer(ptr, numel), contiguous,
                      "cuda_array_interface")


def _typestr_name(typestr: str) -> str:
    try:
        import numpy

        return numpy.dtype(typestr).name  # "|b1" -> "bool"
    except Exception:  # noqa: BLE001 — no NumPy, or a type string it does not know
        return typestr


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _device_of_pointer(ptr: int, numel: int) -> Optional[int]:
    try:
        import cupy
    except ImportError:
        return None  # then no communicator here can take it, and the reason names the device
    try:
        if not numel:  # an empty array may have no memory at all: take the current device
            return cupy.cuda.runtime.getDevice()
        return cupy.cuda.runtime.pointerGetAttributes(ptr).device
    except Exception:  # noqa: BLE001 — not device memory CUDA knows about
        return None


def common_reject_reason(comm, collective: Collective, view: TensorView, op: ReduceOp,
                         root: int) -> Optional[str]:
    """The checks every communicator shares: the reason it cannot take ``view``, or None."""
    if not comm.supports(collective):
        return f"{collective} is not supported by {comm.name}"
    if comm.device_type is DeviceType.CUDA:
        if view.device_type != "cuda":
            return (f"expects CUDA tensors on cuda:{comm.device}, got a tensor on {view.device_type}; "
                    "move it to the GPU first")
        if view.device_index != comm.device:
            return (f"expects tensors on cuda:{comm.device}, got one on cuda:{view.device_index}; "
                    "each rank's tensors must be on its own device")
    elif view.device_type != comm.device_type.value:
        return f"expects {comm.device_type.value.upper()} tensors, got a tensor on {view.device_type}"
    if view.dtype is None or view.dtype not in comm.dtypes:
        supported = ", ".join(sorted(d.value for d in comm.dtypes))
        return f"dtype {view.dtype_name} is not supported by {comm.name}; supported: {supported}"
    if collective is Collective.ALL_REDUCE or collective is Collective.REDUCE_SCATTER:
        if op not in comm.ops:
            supported = ", ".join(o.value for o in ReduceOp if o in comm.ops)
            return f"op {op} is not supported by {comm.name}; supported: {supported}"
        if op is ReduceOp.AVG and not view.dtype.is_floating_point:
            return f"op avg needs a floating-point dtype, got {view.dtype_name} (an integer average would truncate)"
    if not view.contiguous:
        return "the tensor is not contiguous; pass tensor.contiguous() (a copy) or a contiguous buffer"
    if collective is Collective.REDUCE_SCATTER and view.numel % comm.world_size:
        return (f"reduce_scatter needs a number of elements divisible by world_size={comm.world_size}, "
                f"got {view.numel}")
    if collective is Collective.BROADCAST and not 0 <= root < comm.world_size:
        return f"broadcast src={root} is not a rank; expected 0 <= src < {comm.world_size}"
    if collective.is_point_to_point:
        peer = "dst" if collective is Collective.SEND else "src"
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < comm.world_size:
            return f"{collective} {peer}={root!r} is not a rank; expected 0 <= {peer} < {comm.world_size}"
        if root == comm.rank:
            return f"{collective} {peer}={root} is this rank itself"
    return None


def output_view(collective: Collective, src: TensorView, out: Any, world_size: int) -> TensorView:
    """The view results are written to: ``src`` itself, the caller's ``out``, or a new array."""
    if collective is Collective.BROADCAST or collective.is_point_to_point:
        return src
    if out is None:
        if collective is Collective.ALL_REDUCE:
            return src
        if collective is Collective.ALL_GATHER:
            return as_view(_allocate(src, (world_size,) + src.shape))
        first = src.shape[0] if src.shape else 1
        shape = ((first // world_size,) + src.shape[1:] if src.shape and first % world_size == 0
                 else (src.numel // world_size,))
        return as_view(_allocate(src, shape))
    dst = as_view(out)
    if dst.ptr == src.ptr and dst.numel == src.numel and dst.dtype_name == src.dtype_name \
            and collective is Collective.ALL_REDUCE:
        return dst  # out is the input itself: in place
    problem = out_problem(collective, src, dst, world_size)
    if problem:
        raise CommunicatorError(f"{collective}: out {problem}")
    return dst


def out_problem(collective: Collective, src: TensorView, dst: TensorView, world_size: int,
                addresses: bool = True) -> Optional[str]:
    """What is wrong with ``dst`` as the output of ``collective`` on ``src``, or None.

    ``addresses=False`` skips the overlap check (views of tensors without memory).
    """
    expected = {Collective.ALL_REDUCE: src.numel, Collective.ALL_GATHER: src.numel * world_size,
                Collective.REDUCE_SCATTER: src.numel // world_size}[collective]
    if (dst.device_type, dst.device_index) != (src.device_type, src.device_index):
        return f"is on {_where(dst)} but the input is on {_where(src)}"
    if dst.dtype_name != src.dtype_name:
        return f"has dtype {dst.dtype_name} but the input has {src.dtype_name}"
    if collective is Collective.ALL_REDUCE and dst.shape != src.shape:
        return f"has shape {list(dst.shape)} but the input has {list(src.shape)}"
    if dst.numel != expected:
        return f"has {dst.numel} elements, expected {expected}"
    if not dst.contiguous:
        return "is not contiguous"
    if addresses and src.numel and dst.numel and src.device_type == dst.device_type and \
            dst.ptr < src.ptr + src.nbytes and src.ptr < dst.ptr + dst.nbytes:
        return "overlaps the input; pass a separate buffer, or no out for in place"
    return None


def _where(view: TensorView) -> str:
    return view.device_type if view.device_index is None else f"{view.device_type}:{view.device_index}"


def _allocate(like: TensorView, shape: tuple):
    """A new array of ``like``'s library, dtype and device (CuPy for bare CUDA arrays)."""
    if like.tensor is not None and like.library != "cupy":
        import torch

        return torch.empty(shape, dtype=like.tensor.dtype, device=like.tensor.device)
    import cupy

    dtype = like.obj.dtype if like.library == "cupy" else like.dtype_name
    with cupy.cuda.Device(like.device_index):
        return cupy.empty(shape, dtype=dtype)


def stream_of(view: TensorView) -> int:
    """The caller's current CUDA stream for ``view``'s device, as a raw pointer.

    PyTorch's current stream for torch tensors; CuPy's for every other array.
    """
    if view.library == "torch":
        assert view.device_index is not None  # a CUDA view: the only kind that has a stream
        return _torch_stream(view.device_index)
    import cupy

    return cupy.cuda.get_current_stream(view.device_index).ptr


def _torch_stream(index: int) -> int:
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the cheap form Triton uses
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def device_index(device: Any) -> Optional[int]:
    """A CUDA device index from an int, "cuda:1", a torch.device or None ("cpu" gives None)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        if device >= 0:
            return device
    elif not isinstance(device, bool):
        text = str(device)  # torch.device and strings alike
        if text == "cpu":
            return None
        if text == "cuda":
            import torch

            return torch.cuda.current_device()
        if text.startswith("cuda:") and text[5:].isdigit():
            return int(text[5:])
    raise ConfigError(f"device={device!r} is invalid; expected a CUDA device index, 'cuda:N', "
                      "a torch.device, 'cpu' or None")


def debug_enabled(flag: Optional[bool]) -> bool:
    """``flag`` if given, else whether DISTRIB_DEBUG is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("DISTRIB_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
