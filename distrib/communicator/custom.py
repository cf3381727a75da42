"""The custom P2P all-reduce: one node, NVLink-class peer access, small and mid-size tensors.

Each rank shares one buffer with every peer through CUDA IPC; a kernel reads
(or, for the smallest messages, pushes) peers' data directly and reduces it,
in a fixed rank order so that every rank gets bitwise the same result. The
kernels and the memory-ordering argument are in ``kernels/custom_all_reduce.cuh``.

Three algorithms, chosen by size from tables measured per world size (see
``_custom_tables.py``): a barrier-free Lamport one-shot, a one-shot, and a
two-shot. Tensors it cannot take (another dtype or op, not a multiple of 16
bytes, larger than its buffer, non-contiguous) are declined by
``can_all_reduce`` and the dispatcher sends them to NCCL.

CUDA graphs: all-reduces captured inside :meth:`CustomAllReduceCommunicator.capture`
read the captured tensors directly (out-of-place calls) and their IPC
addresses are exchanged once when the ``capture()`` block ends. Whether a call
is being captured is read from the stream itself, so warm-up calls made
inside ``capture()`` before the graph starts still take the eager path.

Fail-stop: a kernel that gives up waiting for a peer writes NaN into its
output and stops the communicator on every rank; a watchdog thread then ends
the process with a report (``on_error="abort"``, the default) or every later
call raises (``on_error="raise"``), so that a late peer never yields a wrong
sum that looks right (the argument is in the kernel's comments).

``all_reduce_add_rms_norm`` runs as one kernel per algorithm (the sum,
the residual add and the RMSNorm of whole rows, a block per row; see the
kernel's "Fused" section), for rows of a multiple of 16 bytes.

Ranks may share a GPU (the launchers' ``share_gpu`` mode): CUDA IPC works
between processes on one device, and the kernels' block counts are capped so
that the blocks of every rank on a GPU fit on it at once, beside their other
kernels (see ``CustomAllReduceEngine``).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from ..errors import CommunicatorError
from ..info import ranks_sharing_a_gpu
from . import _custom_tables, _ipc
from ._custom_all_reduce import ON_ERROR, SUPPORTED_WORLD_SIZES, Limits, agree_limits
from ._tensors import _torch_stream, stream_of
from .api import Collective, Communicator, DeviceType, DType, ReduceOp, TensorView, communicators

__all__ = ["CustomAllReduceCommunicator"]

logger = logging.getLogger("distrib.communicator.custom")

DISABLE_VAR = "DISTRIB_DISABLE_CUSTOM_ALL_REDUCE"
# Keyed by a view's dtype, Optional for the type checker only: the views the hooks get have
# passed the checks, so their dtype is one of these.
_KERNEL_DTYPES: dict[Optional[DType], str] = {DType.FLOAT32: "float32", DType.FLOAT16: "float16",
                                               DType.BFLOAT16: "bfloat16"}


@communicators.register("custom")
class CustomAllReduceCommunicator(Communicator):
    """All-reduce (sum; float32, float16, bfloat16) over CUDA IPC peer buffers, one node.

    Options: ``max_bytes`` (the largest tensor it takes; default from the
    tables, ``DISTRIB_CUSTOM_MAX_BYTES`` overrides), ``timeout`` (seconds a
    kernel waits for a peer before it gives up and the host raises naming
    that peer; default 30, ``DISTRIB_CUSTOM_TIMEOUT``), ``algorithm`` (force
    one of ``lamport_one_shot``, ``one_shot``, ``two_shot``; for tests and
    measurements), ``max_blocks`` (the most thread blocks a one- or two-shot
    kernel uses; default from the tables), ``on_error`` (what happens when a
    kernel gave up waiting for a peer: ``"abort"``, the default, ends the
    process with a report naming the rank, the peer and the call; ``"raise"``
    makes every later call raise :class:`CommunicatorError`; default
    ``DISTRIB_CUSTOM_ON_ERROR``). Every rank must pass the same limits.
    """

    name = "custom"
    priority = 200  # before NCCL (100)
    device_type = DeviceType.CUDA
    dtypes = frozenset(_KERNEL_DTYPES)
    ops = frozenset({ReduceOp.SUM})
    device: int  # never None: unavailable_reason refuses device=None before start-up

    def __init__(self, coordinator, device=None, *, debug: Optional[bool] = None,
                 max_bytes: Optional[int] = None, timeout: Optional[float] = None,
                 algorithm: Optional[str] = None, max_blocks: Optional[int] = None,
                 on_error: Optional[str] = None, fail_stop: bool = True,
                 test_stall: Optional[tuple[int, int, float]] = None):
        self._engine: Any = None  # a CustomAllReduceEngine, once started
        self._options = (max_bytes, timeout, algorithm, max_blocks, on_error)
        # For measurements and tests only (see CustomAllReduceEngine).
        self._kernel_variant: dict[str, Any] = dict(fail_stop=fail_stop, test_stall=test_stall)
        super().__init__(coordinator, device, debug=debug)

    # -- availability (cheap, local) ---------------------------------------------------
    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        if os.environ.get(DISABLE_VAR, "") not in ("", "0"):
            return f"disabled by {DISABLE_VAR}"
        if coordinator.world_size not in SUPPORTED_WORLD_SIZES and coordinator.nnodes == 1:
            return (f"world size {coordinator.world_size} is not supported (supported: "
                    f"{SUPPORTED_WORLD_SIZES})")
        return _ipc.unavailable_reason(coordinator, device)

    # -- start-up (collective) ----------------------------------------------------------
    def _make_token(self) -> bytes:
        return b"custom"  # IPC handles are exchanged in _initialize; no id to share

    def _initialize(self, token: bytes) -> None:
        from ._custom_all_reduce import CustomAllReduceEngine

        bus_ids = _ipc.agree_on_peer_access(self.coordinator, self.device)

        max_bytes, timeout, algorithm, max_blocks, on_error = self._options
        table = _custom_tables.lookup(self.world_size, _device_name(self.device))
        if max_bytes is None:
            max_bytes = int(os.environ.get("DISTRIB_CUSTOM_MAX_BYTES", table.max_bytes))
        if timeout is None:
            timeout = float(os.environ.get("DISTRIB_CUSTOM_TIMEOUT", 30.0))
        if on_error is None:
            on_error = os.environ.get("DISTRIB_CUSTOM_ON_ERROR", "abort")
        if algorithm is not None and algorithm not in _custom_tables.ALGORITHMS:
            raise CommunicatorError(f"algorithm={algorithm!r}; expected one of {_custom_tables.ALGORITHMS}")
        if on_error not in ON_ERROR:
            raise CommunicatorError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
        limits = Limits.of(max_bytes, table.lamport_max_bytes if algorithm is None else max_bytes,
                           table.one_shot_max_bytes, max_blocks or table.max_blocks)
        agree_limits(self.coordinator, limits, algorithm)
        self.table = table
        self.algorithm = algorithm
        # Every rank of the node on a shared GPU counts, members of other groups too.
        self.ranks_per_gpu = max(max(bus_ids.count(b) for b in bus_ids), ranks_sharing_a_gpu())
        self._engine = CustomAllReduceEngine(self.coordinator, self.device, limits, timeout,
                                             ranks_per_gpu=self.ranks_per_gpu, on_error=on_error,
                                             **self._kernel_variant)
        self.max_bytes = self._engine.limits.max_bytes
        _ipc.check_p2p(self.coordinator, bus_ids, self._engine.check_p2p)

    # -- calls ---------------------------------------------------------------------------
    def _check_limits(self, collective: Collective, view: TensorView, op: ReduceOp) -> Optional[str]:
        if collective is not Collective.ALL_REDUCE:
            return f"custom does only all_reduce, not {collective}"
        nbytes = view.nbytes
        if nbytes % 16:
            return f"{nbytes} bytes is not a multiple of 16"
        if nbytes > self.max_bytes:
            return f"{nbytes} bytes exceed the registered buffer ({self.max_bytes} bytes)"
        return None

    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        self._engine.launch(_KERNEL_DTYPES[src.dtype], src.ptr, dst.ptr, src.nbytes, stream_of(src),
                            self.algorithm)

    def _rms_norm_reject(self, call) -> Optional[str]:
        if call.row_bytes % 16:
            return f"a row of {call.row_bytes} bytes is not a multiple of 16 (the fused kernel's packs)"
        return None

    def _all_reduce_add_rms_norm(self, call) -> None:
        self._engine.launch_norm(
            _KERNEL_DTYPES[call.view.dtype], call.view.ptr, call.out.data_ptr(), call.view.nbytes,
            stream_of(call.view), (call.residual.data_ptr(), call.residual_out.data_ptr(), call.weight.data_ptr(),
                                   call.row_bytes // 16, call.eps), self.algorithm)

    def _torch_all_reduce(self, view: TensorView, op: ReduceOp):
        launch, algorithm, index = self._engine.launch, self.algorithm, self.device  # the view's device
        kernel_dtype, nbytes = _KERNEL_DTYPES[view.dtype], view.nbytes

        def run(tensor, out) -> None:
            ptr = tensor.data_ptr()
            launch(kernel_dtype, ptr, ptr if out is None else out.data_ptr(), nbytes, _torch_stream(index),
                   algorithm)
        return run

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Capture CUDA graphs inside this block; their inputs are registered when it ends.

        Collective at exit (one exchange of IPC handles for everything captured):
        every rank must capture the same all-reduces in the same order. Replay
        the graphs only after the block has ended; if registration fails, this
        raises on every rank and those graphs stay unusable (a replay stops
        the communicator instead of reading unregistered memory).
        """
        with self._engine.capturing():
            yield
        count = self._engine.register_graph_buffers()
        if count and self.coordinator.is_master():
            logger.debug("custom all-reduce: registered %d captured inputs", count)

    def check(self) -> None:
        """Raise :class:`CommunicatorError` if a kernel of this communicator gave up, on any rank."""
        self._engine.check()

    def _close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


def _device_name(device: int) -> str:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)["name"].decode(errors="replace")
