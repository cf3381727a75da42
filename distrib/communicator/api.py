"""The Communicator interface: tensor data between the devices of a launch.

A Communicator reduces and moves tensors (``all_reduce`` and friends, and
``send``/``recv`` between two ranks) among the processes of its Coordinator:
the whole launch, or a group of it (then ranks are the group's), on one kind
of device. Every process calls the same collective methods in the same order
with tensors of the same shape and dtype.

Inputs are PyTorch tensors and CuPy arrays (anything with
``__cuda_array_interface__`` or ``__dlpack__``) on the communicator's device,
used in place, never copied. GPU work is enqueued on the caller's current CUDA
stream (PyTorch's current stream for torch tensors, CuPy's for other arrays),
so it orders with the caller's kernels and can be captured in a CUDA graph
where the backend allows; nothing here synchronises with the host.

Bootstrapping follows the proposal: the master makes a unique token, the
Coordinator hands it to every rank, and each rank initialises with
``(token, rank, world_size)``. A vendor adds a communicator by subclassing
:class:`Communicator` and registering it, by name or through the
``distrib.communicators`` entry-point group::

    @communicators.register("myvendor")
    class MyCommunicator(Communicator):
        name = "myvendor"
        priority = 200                     # the dispatcher tries higher first
        device_type = DeviceType.CUDA
        dtypes = frozenset({DType.BFLOAT16, DType.FLOAT32})
        ops = frozenset({ReduceOp.SUM})

        def _make_token(self) -> bytes: ...            # on the master only
        def _initialize(self, token: bytes) -> None: ... # on every rank
        def _all_reduce(self, src, dst, op) -> None: ... # inputs already checked
        def _close(self) -> None: ...

The data hooks it overrides (``_all_reduce``, ``_all_gather``,
``_reduce_scatter``, ``_broadcast``, ``_send``, ``_recv``) are what it
supports; the dispatcher sends every other call down its chain.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

from ..coordinator.api import Coordinator
from ..errors import CommunicatorError, DistribError
from ..registry import Registry
from . import _consensus, _fused, _handles, _tensors
from ._types import Collective, DeviceType, DType, ReduceOp, TensorView

__all__ = ["Collective", "Communicator", "DType", "DeviceType", "ReduceOp", "TensorView",
           "communicators"]


class Communicator(ABC):
    """Tensor operations among the ranks of a Coordinator, on one device.

    Construction is collective over the coordinator (the launch, or a group
    made by :meth:`Coordinator.group`; only its members take part, and
    ``rank``/``world_size`` are the group's): every member constructs the same
    class with its coordinator. If any member cannot start, every member raises
    :class:`CommunicatorError` naming the (global) ranks and their reasons.

    The public data calls check their inputs and raise
    :class:`CommunicatorError` (or :class:`ConfigError` for an unknown op) for
    a tensor on the wrong device, an unsupported dtype or op, a
    non-contiguous tensor, a mismatched ``out``, or a closed communicator,
    before anything is enqueued. Those checks are local: a rank that raises
    leaves its peers waiting in the collective. With ``debug=True`` (or
    ``DISTRIB_DEBUG=1``) every call first compares (collective, shape, dtype,
    op) across ranks through the Coordinator, so a mismatch or a rejected input
    on any rank raises on every rank instead.

    The data calls work unchanged under ``torch.compile`` (``fullgraph=True``
    too): while Dynamo traces them they record distrib's PyTorch operators,
    which name this communicator by ``handle`` (an int, unique in the process)
    and make the same eager call when the compiled code runs. The checks that
    shapes alone allow run while compiling (see ``_ops.py``).

    ``device`` is the CUDA device index of a GPU communicator (ignored by CPU
    ones). Tensors with no elements are accepted and nothing is enqueued.
    A subclass does its start-up work in ``_initialize``: a constructor that
    fails on some ranks before ``super().__init__`` leaves the others out of step.
    """

    name: ClassVar[str] = "abstract"
    priority: ClassVar[Optional[int]] = None  # dispatcher order, higher first; None: only by name
    # Class defaults that an instance may narrow (the dispatcher sets its own).
    device_type: DeviceType = DeviceType.CUDA
    dtypes: frozenset = frozenset()  # of DType
    ops: frozenset = frozenset()     # of ReduceOp
    _closed: bool  # set by _setup

    def __init__(self, coordinator: Coordinator, device: Any = None, *,
                 debug: Optional[bool] = None):
        self._setup(coordinator, device, debug)
        token = _consensus.agree_on_token(self)
        reason = None
        try:
            self._initialize(token)
        except DistribError as exc:  # reported to every rank just below
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 — likewise, from the vendor's library
            reason = f"initialisation failed: {type(exc).__name__}: {exc}"
        _consensus.agree(self, reason, "start", cleanup=self._close)

    # -- availability -------------------------------------------------------
    @classmethod
    def unavailable_reason(cls, coordinator: Coordinator, device: Optional[int]) -> Optional[str]:
        """None if this communicator can run on this rank for ``device``, else why not.

        Cheap and local (no collective calls): the dispatcher asks every rank
        and enables the communicator only where every rank answers None.
        """
        return None

    def supports(self, collective: Collective) -> bool:
        """Whether this communicator implements ``collective`` at all."""
        return collective in _implemented(type(self))  # a str-Enum: "all_gather" works too

    def can_all_reduce(self, tensor: Any, op: "ReduceOp | str" = ReduceOp.SUM) -> Optional[str]:
        """None if :meth:`all_reduce` would take ``tensor`` and ``op``, else the reason.

        Cheap, local and never raises; the dispatcher calls it on every call.
        It gives the same answer on every rank for the same shape, dtype and op.
        """
        if self._closed:
            return f"{self.name} is closed"
        try:
            view, op = _tensors.as_view(tensor), ReduceOp.parse(op)
        except DistribError as exc:
            return str(exc)
        return self._reject(Collective.ALL_REDUCE, view, op, 0)

    # -- data calls -----------------------------------------------------------
    # Each works eagerly and under torch.compile: while Dynamo traces the
    # caller, the call is recorded as one of distrib's PyTorch operators
    # (see _ops.py), which makes this same eager call when the compiled code runs.
    def all_reduce(self, tensor: Any, op: "ReduceOp | str" = ReduceOp.SUM, *, out: Any = None) -> Any:
        """Reduce ``tensor`` over all ranks with ``op``; every rank gets the result.

        In place (returns ``tensor``) by default; with ``out`` (same shape,
        dtype and device, not overlapping ``tensor``) the result goes there,
        ``tensor`` is left unchanged, and ``out`` is returned.
        """
        if _handles.compiling():
            from . import _ops
            return _ops.all_reduce(self, tensor, op, out)
        return self._eager_all_reduce(tensor, op, out)

    def _eager_all_reduce(self, tensor: Any, op: Any, out: Any) -> Any:
        """:meth:`all_reduce` when nothing is being traced (what the operator of a compiled graph runs)."""
        return self._run(Collective.ALL_REDUCE, tensor, op, out, 0)

    def all_reduce_add_rms_norm(self, x: Any, residual: Any, weight: Any, eps: float = 1e-6, *,
                                out: Any = None, residual_out: Any = None) -> tuple[Any, Any]:
        """``residual += all_reduce(x)``, then ``x = rms_norm(residual) * weight``; returns ``(x, residual)``.

        What ends every tensor-parallel block, as vLLM's ``fused_add_rms_norm``
        after the all-reduce. Torch tensors ``[..., hidden]`` of float16,
        bfloat16 or float32: ``residual`` like ``x``, ``weight`` ``[hidden]``,
        all of one dtype and device. The sum is rounded to the dtype before
        the add (as ``all_reduce`` then ``residual += ...`` round it), the norm
        is computed in float32 and rounded once:
        ``x = residual * rsqrt(mean(residual ** 2) + eps) * weight``.
        In place by default; with ``out`` and/or ``residual_out`` (shaped like
        ``x``, not overlapping the inputs) the results go there and the
        inputs they replace are left unchanged.

        Where the communicator has a fused kernel (the custom all-reduce) it
        is one kernel; elsewhere the all-reduce, then PyTorch's add and norm
        (:meth:`can_all_reduce_add_rms_norm` says which and why). ``residual``
        is bitwise the same either way, and ``residual`` must be the same on
        every rank (as in tensor parallelism).
        """
        if _handles.compiling():
            from . import _ops
            return _ops.all_reduce_add_rms_norm(self, x, residual, weight, eps, out, residual_out)
        return self._eager_all_reduce_add_rms_norm(x, residual, weight, eps, out, residual_out)

    def can_all_reduce_add_rms_norm(self, x: Any, residual: Any, weight: Any) -> Optional[str]:
        """None if :meth:`all_reduce_add_rms_norm` would run one fused kernel, else why it runs unfused.

        Cheap, local and never raises; the same answer on every rank for the
        same shapes. A call that cannot run at all (mismatched shapes, say)
        gives its reason too.
        """
        if self._closed:
            return f"{self.name} is closed"
        try:
            return self._fused_member(_fused.check(self, x, residual, weight, 0.0, None, None))[1]
        except DistribError as exc:
            return str(exc)

    def _eager_all_reduce_add_rms_norm(self, x: Any, residual: Any, weight: Any, eps: Any, out: Any,
                                       residual_out: Any) -> tuple[Any, Any]:
        if self._closed:
            raise CommunicatorError(f"this {self.name} communicator is closed; create a new one")
        try:
            call = _fused.check(self, x, residual, weight, eps, out, residual_out)
            member, _ = self._fused_member(call)
        except DistribError as exc:
            if self.debug:
                _consensus.check_peers(self, Collective.ALL_REDUCE, error=str(exc))
            raise
        if self.debug:
            _consensus.check_peers(self, Collective.ALL_REDUCE, signature=(
                _fused.NAME, call.view.dtype_name, list(call.view.shape), call.eps,
                member.name if member is not None else "unfused"))
        if member is None:
            _fused.unfused(self, call)
        elif call.view.numel:
            member._all_reduce_add_rms_norm(call)
        return call.out, call.residual_out

    def _fused_member(self, call: Any) -> tuple[Optional["Communicator"], Optional[str]]:
        """(the communicator whose fused kernel runs ``call``, None), or (None, why the unfused sequence runs).

        Raises :class:`CommunicatorError` when not even the all-reduce can run.
        """
        member = self._select(Collective.ALL_REDUCE, call.view, ReduceOp.SUM, 0)  # a dispatcher's, or self
        reason = member._rms_norm_reject(call)
        return (member, None) if reason is None else (None, f"{member.name}: {reason}")

    def all_gather(self, tensor: Any, *, out: Any = None) -> Any:
        """Every rank's ``tensor``, concatenated in rank order, on every rank.

        Returns ``out`` (``world_size * tensor.numel()`` elements of the same
        dtype and device) or, without it, a new array of shape
        ``(world_size, *tensor.shape)`` of the input's library.
        """
        if _handles.compiling():
            from . import _ops
            return _ops.all_gather(self, tensor, out)
        return self._run(Collective.ALL_GATHER, tensor, ReduceOp.SUM, out, 0)

    def reduce_scatter(self, tensor: Any, op: "ReduceOp | str" = ReduceOp.SUM, *, out: Any = None) -> Any:
        """Reduce ``tensor`` over all ranks; rank r keeps the r-th of ``world_size`` equal chunks.

        ``tensor.numel()`` must divide by ``world_size``. Returns ``out``
        (``numel / world_size`` elements) or, without it, a new array of shape
        ``(shape[0] // world_size, *shape[1:])`` (flat when ``shape[0]`` does not divide).
        """
        if _handles.compiling():
            from . import _ops
            return _ops.reduce_scatter(self, tensor, op, out)
        return self._run(Collective.REDUCE_SCATTER, tensor, op, out, 0)

    def broadcast(self, tensor: Any, src: int = 0) -> Any:
        """Overwrite ``tensor`` on every rank with rank ``src``'s; returns ``tensor``."""
        if _handles.compiling():
            from . import _ops
            return _ops.broadcast(self, tensor, src)
        return self._run(Collective.BROADCAST, tensor, ReduceOp.SUM, None, src)

    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to rank ``dst``, which takes it with :meth:`recv`.

        The receiver passes a tensor of the same shape, dtype and kind of
        device. Messages between two ranks arrive in the order they were sent.
        Enqueued on the caller's current stream; where the backend allows
        (NCCL, CUDA IPC) it can be captured in a CUDA graph, with its recv
        captured on the peer. A send may wait for its recv (a message larger
        than the backend buffers), so two ranks that send to each other first
        and receive second can wait on each other: give one of them the other order.
        """
        self._run(Collective.SEND, tensor, ReduceOp.SUM, None, dst)

    def recv(self, tensor: Any, src: int) -> Any:
        """Receive into ``tensor`` what rank ``src`` sent with :meth:`send`; returns ``tensor``."""
        return self._run(Collective.RECV, tensor, ReduceOp.SUM, None, src)

    def send_tensor_dict(self, tensors: Mapping[str, Any], dst: int) -> None:
        """Send a dict of torch tensors and plain values to rank ``dst`` (see :meth:`recv_tensor_dict`).

        Its keys, the tensors' dtypes, shapes and devices, and the plain
        values (numbers, strings, bytes, lists and dicts of them) travel over
        the Coordinator; then each tensor goes through :meth:`send`, in the
        dict's order (a non-contiguous one as a contiguous copy).
        """
        from ..control import codec

        if not isinstance(tensors, Mapping):
            raise CommunicatorError(f"send_tensor_dict takes a dict, got {type(tensors).__name__}")
        data = []
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise CommunicatorError(f"send_tensor_dict: key {key!r} is not a str")
            if _is_torch_tensor(value):
                data.append(value if value.is_contiguous() else value.contiguous())
            elif _holds_tensor(value):
                raise CommunicatorError(f"send_tensor_dict: {key!r} holds a tensor inside a "
                                        f"{type(value).__name__}; tensors must be the dict's values")
        try:
            meta = codec.encode(dict(tensors))
        except codec.MessageError as exc:
            raise CommunicatorError(f"send_tensor_dict: {exc}") from exc
        self.coordinator.send(meta, dst)
        for tensor in data:
            self.send(tensor, dst)

    def recv_tensor_dict(self, src: int) -> dict:
        """The dict rank ``src`` sent with :meth:`send_tensor_dict`.

        Its tensors are new, on this communicator's device where the sender's
        were on a GPU, else on the CPU.
        """
        import torch

        from ..control import codec

        message = codec.decode(self.coordinator.recv(src))
        if not isinstance(message, dict):
            raise CommunicatorError(f"recv_tensor_dict: rank {self.coordinator.ranks[src]} sent "
                                    f"{type(message).__name__}, not a tensor dict; are the ranks out of step?")
        result = {}
        for key, value in message.items():
            if isinstance(value, codec.TensorMeta):
                # (torch.device takes index None, the current device, which its stub leaves out)
                device = ("cpu" if value.device == "cpu"
                          else torch.device("cuda", self.device))  # type: ignore[arg-type]
                value = self.recv(torch.empty(value.shape, dtype=_torch_dtype(value.dtype), device=device), src)
            result[key] = value
        return result

    def _run(self, collective: Collective, tensor: Any, op: Any, out: Any, root: int) -> Any:
        """The eager path of every data call: read the tensor, pick who runs it, check, enqueue.

        Nothing is enqueued until every check has passed, and in debug mode
        until every rank has shown the same call (or its reason to refuse it).
        Returns the object holding the result.
        """
        if self._closed:
            raise CommunicatorError(f"this {self.name} communicator is closed; create a new one")
        try:
            op = ReduceOp.parse(op)
            src = _tensors.as_view(tensor)
            chosen = self._select(collective, src, op, root)  # self, or a dispatcher's member
            dst = _tensors.output_view(collective, src, out, self.world_size)
        except DistribError as exc:
            if self.debug:
                _consensus.check_peers(self, collective, error=str(exc), peer=root)
            raise
        if self.debug:
            _consensus.check_peers(self, collective, signature=(
                collective.value, op.value, src.dtype_name, list(src.shape), root, chosen.name), peer=root)
        if not src.numel:  # nothing to move; every rank skips alike, since shapes match
            return dst.obj
        if collective is Collective.ALL_REDUCE:
            chosen._all_reduce(src, dst, op)
        elif collective is Collective.ALL_GATHER:
            chosen._all_gather(src, dst)
        elif collective is Collective.REDUCE_SCATTER:
            chosen._reduce_scatter(src, dst, op)
        elif collective is Collective.BROADCAST:
            chosen._broadcast(src, root)
        elif collective is Collective.SEND:
            chosen._send(src, root)
        else:
            chosen._recv(src, root)
        return dst.obj

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Capture CUDA graphs inside this block.

        A communicator that must prepare captured work (the custom all-reduce
        registers the captured tensors' IPC addresses) does it when the block
        ends, collectively; the default needs nothing. Warm-up calls made inside
        the block but outside a graph capture stay ordinary eager calls.
        """
        yield

    # -- lifetime ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this rank's resources. Idempotent; not a collective.

        Close only after the work enqueued on streams (and CUDA graphs that
        captured it) is finished with.
        """
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", device={self.device}" if self.device is not None else ""
        state = ", closed" if self._closed else ""
        return f"<{type(self).__name__} {self.name!r} rank {self.rank}/{self.world_size}{where}{state}>"

    # -- what an implementation supplies ---------------------------------------
    @abstractmethod
    def _make_token(self) -> bytes:
        """The unique token of a new communicator (runs on the master only)."""

    @abstractmethod
    def _initialize(self, token: bytes) -> None:
        """Join the communicator named by ``token`` as (``self.rank``, ``self.world_size``)."""

    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        """Enqueue the reduction of ``src`` into ``dst`` (``dst is src`` when in place).

        Inputs are checked: on this device, contiguous, a supported dtype and
        op, at least one element, within :meth:`_check_limits`.
        """
        raise CommunicatorError(f"all_reduce is not supported by {self.name}")

    def _all_gather(self, src: TensorView, dst: TensorView) -> None:
        raise CommunicatorError(f"all_gather is not supported by {self.name}")

    def _reduce_scatter(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        raise CommunicatorError(f"reduce_scatter is not supported by {self.name}")

    def _broadcast(self, view: TensorView, src: int) -> None:
        raise CommunicatorError(f"broadcast is not supported by {self.name}")

    def _send(self, view: TensorView, dst: int) -> None:
        """Enqueue sending ``view`` to rank ``dst`` (checked: a valid peer, not this rank)."""
        raise CommunicatorError(f"send is not supported by {self.name}")

    def _recv(self, view: TensorView, src: int) -> None:
        """Enqueue receiving into ``view`` from rank ``src``."""
        raise CommunicatorError(f"recv is not supported by {self.name}")

    def _rms_norm_reject(self, call: Any) -> Optional[str]:
        """Why this communicator has no fused kernel for ``call`` (a checked ``_fused.FusedCall``), or None.

        Asked only once its all-reduce takes ``call.view``. The default: no
        fused kernel, so the dispatcher runs the all-reduce and PyTorch ops.
        """
        return "no fused kernel (runs its all_reduce, then PyTorch's add and RMSNorm)"

    def _all_reduce_add_rms_norm(self, call: Any) -> None:
        """Enqueue the fused kernel for ``call`` (checked; has elements; ``_rms_norm_reject`` said None)."""
        raise CommunicatorError(f"all_reduce_add_rms_norm has no fused kernel in {self.name}")

    def _torch_all_reduce(self, view: TensorView, op: ReduceOp) -> Optional[Callable[[Any, Any], None]]:
        """Optional: a direct launcher for torch tensors like ``view`` (same dtype, shape, device).

        The dispatcher caches it per (dtype, shape, device, op) after the
        first call has passed every check, and then calls ``fn(tensor, out)``
        (``out`` None for in place, else contiguous and disjoint) without
        reading the tensor again: it must re-read only the data pointers and
        the current stream. Return None to always take the checked path.
        """
        return None

    def _check_limits(self, collective: Collective, view: TensorView, op: ReduceOp) -> Optional[str]:
        """Limits beyond the common checks (a size cap, an alignment), or None.

        Called on every data call after device, dtype, op and layout passed;
        keep it cheap, and depend only on shape, dtype, op and global state.
        """
        return None

    @abstractmethod
    def _close(self) -> None:
        """Release this rank's resources (called once)."""

    # -- the shared path of every data call --------------------------------------
    def _setup(self, coordinator: Coordinator, device: Any, debug: Optional[bool]) -> None:
        self.coordinator = coordinator
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.global_rank = getattr(coordinator, "global_rank", self.rank)  # what messages name
        # " in group tp (ranks 4-5)" where the coordinator is a group, for messages
        self._on_group = "" if getattr(coordinator, "is_world", True) else f" in {coordinator.describe()}"
        self.device = _tensors.device_index(device) if self.device_type is DeviceType.CUDA else None
        self.debug = _tensors.debug_enabled(debug)
        self._closed = False
        self.handle = _handles.register(self)  # how compiled graphs name this communicator

    def _reject(self, collective: Collective, view: TensorView, op: ReduceOp, root: int) -> Optional[str]:
        """Why this communicator cannot run ``collective`` on ``view``, or None."""
        if self._closed:  # a dispatcher's member closed on its own
            return f"{self.name} is closed"
        return (_tensors.common_reject_reason(self, collective, view, op, root)
                or self._check_limits(collective, view, op))

    def _select(self, collective: Collective, view: TensorView, op: ReduceOp, root: int) -> "Communicator":
        """The communicator that runs this call (the dispatcher picks one of its chain)."""
        reason = self._reject(collective, view, op, root)
        if reason is not None:
            raise CommunicatorError(f"{self.name} {collective}: {reason}")
        return self


@functools.lru_cache(maxsize=None)
def _implemented(cls: type) -> frozenset:
    """The data calls whose hook ``cls`` overrides."""
    return frozenset(c for c in Collective
                     if getattr(cls, f"_{c.value}") is not getattr(Communicator, f"_{c.value}"))


def _is_torch_tensor(value: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_torch_tensor(v) or _holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_is_torch_tensor(v) or _holds_tensor(v) for v in value.values())
    return False


def _torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CommunicatorError(f"recv_tensor_dict: unknown dtype {name!r} from the sender")
    return dtype


communicators: Registry[type[Communicator]] = Registry("communicator", "distrib.communicators")
