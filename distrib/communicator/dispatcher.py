"""The dispatcher: one object users hold, routing each call down a fallback chain.

``create()`` builds a chain of communicators, highest ``priority`` first (or
in an explicit ``order``): the custom P2P all-reduce, then NCCL for GPU
tensors, then gloo for CPU tensors, plus whatever plug-ins are installed.
Each call goes to the first communicator of the chain whose cheap check
(``can_all_reduce`` and the like) accepts the tensor.

Building the chain is collective and agreed by every rank: a communicator is
enabled only if it is available on every rank and started on every rank;
otherwise it is left out everywhere and the reason is logged once (by rank 0)
and kept in :attr:`Dispatcher.disabled`.
"""
from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

from ..coordinator.api import Coordinator
from ..errors import CommunicatorError, ConfigError, DistribError
from . import _consensus, _handles
from ._tensors import as_view
from .api import Collective, Communicator, DeviceType, ReduceOp, TensorView, communicators

__all__ = ["Dispatcher", "create"]

logger = logging.getLogger("distrib.communicator")

# Built-in communicators whose module failed to import: name -> reason (filled
# by the package's __init__), so that the dispatcher can say why they are missing.
not_imported: dict[str, str] = {}


class Dispatcher(Communicator):
    """Routes every data call to the first communicator of its chain that can take it.

    ``chain`` holds the enabled communicators in the order they are tried;
    ``disabled`` maps each left-out communicator's name to the reason.
    Its ``dtypes`` and ``ops`` are those of the chain's members on its main
    device (the GPU when it has one, else the CPU).
    """

    name = "dispatcher"

    def __init__(self, coordinator: Coordinator, device: Any = None,
                 order: Optional[Sequence[str]] = None, *, debug: Optional[bool] = None,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None):
        # No token of its own (Communicator.__init__ is not called): it starts its members.
        self._setup(coordinator, device, debug)  # keeps the CUDA device index, if any
        self.device_type = DeviceType.CUDA if self.device is not None else DeviceType.CPU
        self.disabled: dict[str, str] = {}
        self._fast: dict = {}  # (dtype, shape, device, op, out layout) -> direct launcher or None
        self.chain: tuple[Communicator, ...] = tuple(self._start(_candidates(order), options or {}))
        if not self.chain:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.disabled.items()) or "none registered"
            raise CommunicatorError(f"no communicator could start on any rank ({reasons})")
        main = [c for c in self.chain if c.device_type is self.device_type
                or (self.device_type is DeviceType.CUDA and getattr(c, "stages_cuda", False))] or list(self.chain)
        self.dtypes = frozenset().union(*(c.dtypes for c in main))
        self.ops = frozenset().union(*(c.ops for c in main))

    # -- building the chain ---------------------------------------------------------
    def _start(self, candidates: list[tuple[str, Any]], options: Mapping[str, Mapping[str, Any]]):
        # 1. Availability, asked of every rank at once.
        local: dict[str, Optional[str]] = {}
        for name, cls in candidates:
            if isinstance(cls, str):  # the plug-in failed to import: a reason, not a class
                local[name] = cls
            else:
                local[name] = _consensus.local_unavailable_reason(cls, self.coordinator, self.device)
        everyone = _gather_reasons(self.coordinator, local)
        # 2. Start the available ones, in order; each start is itself collective.
        started: dict[str, Communicator] = {}
        failed: dict[str, str] = {}
        for name, cls in candidates:
            reason = everyone.get(name)
            if reason is not None:
                self._disable(name, reason, logging.INFO)
                continue
            try:
                started[name] = cls(self.coordinator, self.device, debug=self.debug,
                                    **dict(options.get(name, {})))
            except DistribError as exc:  # already agreed by every rank (see Communicator)
                self._disable(name, str(exc), logging.WARNING)
            except Exception as exc:  # noqa: BLE001 — a plug-in bug: agreed on in step 3
                failed[name] = f"{type(exc).__name__}: {exc}"
        # 3. A start that failed on some rank outside the collective path drops it everywhere.
        everyone = _gather_reasons(self.coordinator, {n: failed.get(n) for n in started.keys() | failed.keys()})
        chain = []
        for name, _ in candidates:
            reason = everyone.get(name)
            comm = started.get(name)
            if reason is not None:
                if comm is not None:
                    comm.close()
                self._disable(name, f"could not start: {reason}", logging.WARNING)
            elif comm is not None:
                chain.append(comm)
        return chain

    def _disable(self, name: str, reason: str, level: int) -> None:
        self.disabled[name] = reason
        if self.coordinator.is_master():
            logger.log(level, "communicator %r disabled%s: %s", name, self._on_group, reason)

    # -- the eager fast path -----------------------------------------------------------
    def all_reduce(self, tensor: Any, op: "ReduceOp | str" = ReduceOp.SUM, *, out: Any = None) -> Any:
        """As :meth:`Communicator.all_reduce`; repeated torch calls of one shape skip the checks.

        The first call with a given (dtype, shape, device, op, out layout) takes
        the checked path; the member it chose may hand back a direct launcher,
        which later such calls use after re-checking only what can change
        between them (contiguity, and that ``out`` does not overlap the input).
        """
        if _handles.compiling():  # torch.compile is tracing: record the operator (see Communicator)
            from . import _ops
            return _ops.all_reduce(self, tensor, op, out)
        return self._eager_all_reduce(tensor, op, out)

    def _eager_all_reduce(self, tensor: Any, op: Any, out: Any) -> Any:
        torch = sys.modules.get("torch")  # a torch tensor implies torch is imported
        if torch is None or self.debug or self._closed or tensor.__class__ is not torch.Tensor:
            return self._run(Collective.ALL_REDUCE, tensor, op, out, 0)
        if out is not None and (out.__class__ is not torch.Tensor or out.data_ptr() == tensor.data_ptr()):
            return self._run(Collective.ALL_REDUCE, tensor, op, out, 0)
        key = (tensor.dtype, tensor.shape, tensor.device, op,
               None if out is None else (out.dtype, out.shape, out.device))
        fast = self._fast.get(key, _MISSING)
        if fast is not _MISSING and fast is not None and tensor.is_contiguous() and (
                out is None or (out.is_contiguous() and _disjoint(tensor, out))):
            fast(tensor, out)
            return tensor if out is None else out
        result = self._run(Collective.ALL_REDUCE, tensor, op, out, 0)
        if fast is _MISSING:
            if len(self._fast) > 1024:
                self._fast.clear()
            view, parsed = as_view(tensor), ReduceOp.parse(op)
            self._fast[key] = self._select(Collective.ALL_REDUCE, view, parsed, 0)._torch_all_reduce(view, parsed)
        return result

    # -- routing --------------------------------------------------------------------
    def supports(self, collective: Collective) -> bool:
        return any(c.supports(collective) for c in self.chain)

    def _reject(self, collective: Collective, view: TensorView, op: ReduceOp, root: int) -> Optional[str]:
        reasons = []
        for comm in self.chain:
            reason = comm._reject(collective, view, op, root)
            if reason is None:
                return None
            reasons.append(f"{comm.name}: {reason}")
        return "no communicator can take it (" + "; ".join(reasons) + ")"

    def _select(self, collective: Collective, view: TensorView, op: ReduceOp, root: int) -> Communicator:
        for comm in self.chain:
            if comm._reject(collective, view, op, root) is None:
                return comm
        raise CommunicatorError(f"{collective}: {self._reject(collective, view, op, root)}")

    def communicator_for(self, tensor: Any, op: "ReduceOp | str" = ReduceOp.SUM,
                         collective: "Collective | str" = Collective.ALL_REDUCE,
                         peer: Optional[int] = None) -> Optional[Communicator]:
        """The chain member that would run ``collective`` on ``tensor``, or None.

        ``peer``: the root of a broadcast, or the other rank of a send or recv
        (default: 0 for a broadcast, the next rank for a send or recv).
        """
        try:
            view, op = as_view(tensor), ReduceOp.parse(op)
        except DistribError:
            return None
        collective = Collective(collective)
        if peer is None:
            peer = (self.rank + 1) % self.world_size if collective.is_point_to_point else 0
        return next((c for c in self.chain if c._reject(collective, view, op, peer) is None), None)

    def __getitem__(self, name: str) -> Communicator:
        for comm in self.chain:
            if comm.name == name:
                return comm
        why = self.disabled.get(name, "it is not in this dispatcher's chain")
        raise KeyError(f"communicator {name!r} is not enabled: {why}")

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Enter every member's :meth:`Communicator.capture` (see there)."""
        with ExitStack() as stack:
            for comm in self.chain:
                stack.enter_context(comm.capture())
            yield

    def describe(self) -> str:
        """The chain in order, then the disabled communicators and why."""
        lines = [f"{i + 1}. {c.name}" for i, c in enumerate(self.chain)]
        lines += [f"-  {n}: disabled ({r})" for n, r in self.disabled.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        names = " > ".join(c.name for c in self.chain)
        return f"<Dispatcher rank {self.rank}/{self.world_size} [{names}]{' closed' if self._closed else ''}>"

    # -- Communicator's hooks: the dispatcher makes no token and runs nothing itself --
    def _make_token(self) -> bytes:
        raise CommunicatorError("a Dispatcher has no token of its own")

    def _initialize(self, token: bytes) -> None:
        raise CommunicatorError("a Dispatcher starts its members, not a communicator of its own")

    def _all_reduce(self, src: TensorView, dst: TensorView, op: ReduceOp) -> None:
        raise CommunicatorError("a Dispatcher runs every call through a member of its chain")

    def _close(self) -> None:
        for comm in reversed(self.chain):
            comm.close()


_MISSING = object()


def _disjoint(a, b) -> bool:
    n = a.numel() * a.element_size()
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa + n <= pb or pb + n <= pa


def create(coordinator: Optional[Coordinator] = None, device: Any = None,
           order: Optional[Sequence[str]] = None, *, debug: Optional[bool] = None,
           options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dispatcher:
    """The communicator users hold: a :class:`Dispatcher` over every usable communicator.

    Collective: every rank calls it with the same arguments.

    - ``coordinator``: default ``distrib.init().coordinator``.
    - ``device``: the CUDA device of GPU communicators; default the device the
      launcher gave this rank, else the current CUDA device when CUDA is
      available, else none (CPU tensors only).
    - ``order``: communicator names to try, in order (default: every
      registered communicator with a priority, highest first).
    - ``debug``: compare every call across ranks first (default ``DISTRIB_DEBUG``).
    - ``options``: keyword arguments per communicator name, e.g.
      ``{"gloo": {"timeout": 60}}``.
    """
    context = None
    if coordinator is None:
        from ..runtime import init

        context = init()
        coordinator = context.coordinator
    elif device is None:
        from ..runtime import get_context, is_initialized

        context = get_context() if is_initialized() else None
    if device is None:
        device = context.device if context is not None and context.device is not None \
            else _current_cuda_device()
    return Dispatcher(coordinator, device, order, debug=debug, options=options)


def _current_cuda_device() -> Optional[int]:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _candidates(order: Optional[Sequence[str]]) -> list[tuple[str, Any]]:
    """(name, class) in the order to try; a plug-in that fails to import gives (name, reason)."""
    if order is not None:
        if isinstance(order, str):
            raise ConfigError(f"order={order!r} must be a list of communicator names, not a string")
        names = list(order)
        if len(set(names)) != len(names):
            raise ConfigError(f"order={names!r} names a communicator twice")
        unknown = [n for n in names if n not in communicators and n not in not_imported]
        if unknown:
            communicators.get(unknown[0])  # raises ConfigError listing the known names
        return [(n, not_imported[n] if n in not_imported and n not in communicators else _load(n))
                for n in names]
    loaded = [(n, _load(n)) for n in communicators.names()]
    loaded += [(n, reason) for n, reason in not_imported.items() if n not in communicators]
    ranked = [(n, c) for n, c in loaded if isinstance(c, str) or c.priority is not None]
    return sorted(ranked, key=lambda item: (-(getattr(item[1], "priority", None) or 0), item[0]))


def _load(name: str) -> Any:
    try:
        cls = communicators.get(name)
    except ConfigError as exc:  # an installed plug-in that does not import
        return str(exc)
    if not (isinstance(cls, type) and issubclass(cls, Communicator)):
        return f"registered object {cls!r} is not a Communicator subclass"
    return cls


def _gather_reasons(coordinator: Coordinator, local: dict) -> dict:
    """Every rank's reasons, merged: name -> 'rank r: reason; ...' (global ranks) where any rank has one."""
    import json

    from .._text import rank_list

    replies = [json.loads(r) for r in coordinator.all_gather(json.dumps(local).encode())]
    merged = {}
    for name in local:
        groups: dict = {}
        for rank, reply in enumerate(replies):
            reason = reply.get(name, "this rank does not know it (different plug-ins installed?)")
            if reason is not None:
                groups.setdefault(reason, []).append(coordinator.ranks[rank])
        if groups:
            merged[name] = "; ".join(f"{rank_list(r)}: {reason}" for reason, r in groups.items())
    return merged
