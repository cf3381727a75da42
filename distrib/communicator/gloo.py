"""gloo on CPU tensors: the communicator that makes the whole stack run anywhere.

Given a CUDA device, it also takes torch tensors on that device that no GPU
communicator of the chain takes (ranks sharing one GPU, where NCCL refuses
to run; an op the custom kernel lacks): it copies them to host memory,
reduces there and copies back, on the caller's current stream. That is slow
and synchronises with the host, so it is refused inside a CUDA-graph capture.

It owns its own gloo process group, built on a prefixed view of the launch's
rendezvous store, so it never initialises or changes the user's default
``torch.distributed`` group. The token the master makes is the store prefix:
two gloo communicators of one launch never share keys. Every operation has a
timeout (the coordinator's by default), and a timeout or failure leaves the
communicator unusable, because ranks may be out of step after it.
"""
from __future__ import annotations

import datetime
import secrets
from typing import Any, Optional

from ..coordinator.api import DEFAULT_TIMEOUT
from ..errors import CommunicatorError, DistribTimeoutError
from .api import Collective, Communicator, DeviceType, DType, ReduceOp, TensorView, communicators

__all__ = ["GlooCommunicator"]


@communicators.register("gloo")
class GlooCommunicator(Communicator):
    """Collectives on CPU tensors through a private ``ProcessGroupGloo``.

    ``avg`` is a sum followed by a division by ``world_size`` (floating-point
    dtypes only), so it behaves the same on every PyTorch version.
    """

    name = "gloo"
    priority = 0
    device_type = DeviceType.CPU
    dtypes = frozenset(DType)
    ops = frozenset(ReduceOp)

    def __init__(self, coordinator, device=None, *, debug: Optional[bool] = None,
                 timeout: Optional[float] = None):
        self.timeout = float(timeout if timeout is not None
                             else getattr(coordinator, "timeout", DEFAULT_TIMEOUT))
        # Any: torch's stubs leave out ProcessGroupGloo's collectives and send/recv.
        self._pg: Any = None
        self._broken: Optional[str] = None
        self._abandoned: list = []  # point-to-point work that timed out
        self._native_reduce_scatter = True
        self._staging_device = _cuda_index(device)
        self.stages_cuda = self._staging_device is not None  # takes CUDA tensors through host memory
        super().__init__(coordinator, device, debug=debug)

    @classmethod
    def unavailable_reason(cls, coordinator, device) -> Optional[str]:
        import torch.distributed as dist

        if not dist.is_available():
            return "this PyTorch build has no torch.distributed"
        if not dist.is_gloo_available():
            return "this PyTorch build has no gloo backend"
        return None

    def _make_token(self) -> bytes:
        return secrets.token_hex(8).encode()

    def _initialize(self, token: bytes) -> None:
        import torch.distributed as dist

        store = _rendezvous_store(self.coordinator, self.timeout)
        prefix = f"distrib/{self.coordinator.info.launch_id}/communicator/gloo/{token.decode()}"
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), self.rank, self.world_size,
                                         datetime.timedelta(seconds=self.timeout))

    def _reject(self, collective: Collective, view: TensorView, op: ReduceOp, root: int) -> Optional[str]:
        if view.device_type != "cuda" or self._staging_device is None:
            return super()._reject(collective, view, op, root)
        if view.library != "torch":
            return "gloo copies only torch tensors between a GPU and host memory"
        if view.device_index != self._staging_device:
            return (f"expects tensors on cuda:{self._staging_device}, got one on cuda:{view.device_index}; "
                    "each rank's tensors must be on its own device")
        import torch

        if torch.cuda.is_current_stream_capturing():
            return "gloo copies through host memory, which a CUDA graph cannot capture"
        return super()._reject(collective, view._replace(device_type="cpu", device_index=None), op, root)

    def _check_limits(self, collective: Collective, view: TensorView, op: ReduceOp) -> Optional[str]:
        if self._broken:
            return (f"gloo is unusable after an earlier failure ({self._broken}); ranks may be out "
                    "of step, so the launch should stop")
        return None

    # -- operations -----------------------------------------------------------
    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        if src.device_type == "cuda":
            return _through_host(self._all_reduce, src, dst, op)
        tensor = dst.tensor
        if dst.ptr != src.ptr:
            tensor.copy_(src.tensor)
        options = _options("AllreduceOptions", self.timeout, reduceOp=_gloo_op(op))
        self._wait("all_reduce", lambda: self._pg.allreduce([tensor], options))
        if op is ReduceOp.AVG:
            tensor.div_(self.world_size)

    def _all_gather(self, src: TensorView, dst: TensorView) -> None:
        if src.device_type == "cuda":
            return _through_host(self._all_gather, src, dst)
        # The list form works on every PyTorch version; the outputs are views of dst.
        outputs = list(dst.tensor.view(-1).view(self.world_size, src.numel).unbind(0))
        options = _options("AllgatherOptions", self.timeout)
        self._wait("all_gather", lambda: self._pg.allgather([outputs], [src.tensor.view(-1)], options))

    def _reduce_scatter(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        if src.device_type == "cuda":
            return _through_host(self._reduce_scatter, src, dst, op)
        out, flat = dst.tensor.view(-1), src.tensor.view(-1)
        options = _options("ReduceScatterOptions", self.timeout, reduceOp=_gloo_op(op))
        if self._native_reduce_scatter:
            try:
                self._pg._reduce_scatter_base(out, flat, options).wait()
            except RuntimeError as exc:
                if "support" not in str(exc):
                    self._fail("reduce_scatter", exc)
                # An older gloo without reduce-scatter: the same on every rank,
                # and raised before any data moved.
                self._native_reduce_scatter = False
        if not self._native_reduce_scatter:
            whole = flat.clone()
            options = _options("AllreduceOptions", self.timeout, reduceOp=_gloo_op(op))
            self._wait("reduce_scatter", lambda: self._pg.allreduce([whole], options))
            out.copy_(whole.view(self.world_size, -1)[self.rank])
        if op is ReduceOp.AVG:
            out.div_(self.world_size)

    def _broadcast(self, view: TensorView, src: int) -> None:
        if view.device_type == "cuda":
            return _through_host(lambda host, _, root: self._broadcast(host, root), view, view, src)
        options = _options("BroadcastOptions", self.timeout, rootRank=src)
        self._wait("broadcast", lambda: self._pg.broadcast([view.tensor], options))

    def _send(self, view: TensorView, dst: int) -> None:
        if view.device_type == "cuda":  # .cpu() waits for the caller's stream
            return self._send(_as_host_view(view.tensor.cpu()), dst)
        self._p2p("send", dst, view.tensor)

    def _recv(self, view: TensorView, src: int) -> None:
        if view.device_type == "cuda":
            host = view.tensor.new_empty(view.tensor.shape, device="cpu")
            self._p2p("recv", src, host)
            view.tensor.copy_(host)
            return
        self._p2p("recv", src, view.tensor)

    def _p2p(self, what: str, peer: int, tensor) -> None:
        work = (self._pg.send if what == "send" else self._pg.recv)([tensor.view(-1)], peer, 0)
        try:
            work.wait(datetime.timedelta(seconds=self.timeout))
        except Exception as exc:  # noqa: BLE001 — every gloo failure becomes ours
            self._abandoned.append((work, tensor))  # gloo may still write into it: keep it alive
            self._fail(what, exc, peer)

    def _close(self) -> None:
        self._pg = None  # gloo closes its sockets when the last reference goes

    # -- plumbing -------------------------------------------------------------
    def _wait(self, what: str, start) -> None:
        try:
            start().wait()
        except Exception as exc:  # noqa: BLE001 — every gloo failure becomes ours
            self._fail(what, exc)

    def _fail(self, what: str, exc: BaseException, peer: Optional[int] = None):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._broken = f"{what} failed: {text}"
        where = f"on rank {self.global_rank}{self._on_group}"
        if peer is not None:
            other = self.coordinator.ranks[peer]
            what = f"{what} {'to' if what == 'send' else 'from'} rank {other}"
            if "timeout" in text.lower() or "timed out" in text.lower():
                raise DistribTimeoutError(
                    f"gloo {what} timed out after {self.timeout:g}s {where}: rank {other} never made the "
                    f"matching {'recv' if what.startswith('send') else 'send'} (hung, dead, or busy "
                    "elsewhere)", missing=[other]) from exc
        elif "timeout" in text.lower() or "timed out" in text.lower():
            raise DistribTimeoutError(
                f"gloo {what} timed out after {self.timeout:g}s {where}: a peer did not "
                "call it with a matching tensor, or has died") from exc
        raise CommunicatorError(
            f"gloo {what} failed {where}: {text}. A peer process probably exited or "
            "passed a different tensor; check its output.") from exc


def _as_host_view(tensor) -> TensorView:
    from ._tensors import as_view

    return as_view(tensor)


def _cuda_index(device) -> Optional[int]:
    """The CUDA device index a dispatcher passed (an int), or None for a CPU-only communicator."""
    return device if isinstance(device, int) and not isinstance(device, bool) and device >= 0 else None


def _through_host(call, src: TensorView, dst: TensorView, *rest) -> None:
    """``call`` on host copies of the CUDA tensors ``src`` and ``dst``; the result is copied back.

    ``.cpu()`` waits for the caller's stream; the copy back is enqueued on it.
    """
    from ._tensors import as_view

    host_src = as_view(src.tensor.cpu())
    host_dst = host_src if dst.ptr == src.ptr else as_view(dst.tensor.new_empty(dst.tensor.shape, device="cpu"))
    call(host_src, host_dst, *rest)
    dst.tensor.copy_(host_dst.tensor)


def _rendezvous_store(coordinator, timeout: float):
    """The coordinator's store when it shares one, else a new client of the launch's store."""
    store = getattr(coordinator, "store", None)
    if store is not None:
        return store
    from .._store import connect_store

    return connect_store(coordinator.info, timeout)


def _gloo_op(op: ReduceOp):
    from torch._C._distributed_c10d import ReduceOp as TorchReduceOp

    return {ReduceOp.SUM: TorchReduceOp.SUM, ReduceOp.AVG: TorchReduceOp.SUM,
            ReduceOp.PROD: TorchReduceOp.PRODUCT, ReduceOp.MAX: TorchReduceOp.MAX,
            ReduceOp.MIN: TorchReduceOp.MIN}[op]


def _options(kind: str, timeout: float, **fields):
    from torch._C import _distributed_c10d as c10d

    options = getattr(c10d, kind)()
    options.timeout = datetime.timedelta(seconds=timeout)
    for name, value in fields.items():
        setattr(options, name, value)
    return options
