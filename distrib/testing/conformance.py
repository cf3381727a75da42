"""A conformance suite any Communicator can run against itself, on N ranks.

In every rank of a launch::

    report = run_conformance("gloo")              # a registered name, a class,
    report = run_conformance(MyCommunicator)      # or a factory called as
    report = run_conformance(partial(create, order=["nccl"]))   # f(coordinator, device, debug=...)

or from the launching process, ``launch_conformance("nccl", 2, devices=[0, 1])``.

It checks every dtype and op the communicator declares (``dtypes``, ``ops``)
over shapes that include empty and odd sizes: ``all_reduce`` in place and out
of place (a tensor its limits decline must be declined alike by
``can_all_reduce`` and ``all_reduce``, and is listed in the report; the other
collectives, where supported, must take every shape), ``all_gather``,
``reduce_scatter``, ``broadcast`` and ``send``/``recv`` (with tensor dicts)
where supported, the cheap ``can_all_reduce`` check, bad inputs (each must
raise a clear :class:`~distrib.errors.DistribError` before anything is sent,
and leave the communicator usable), debug mode (a mismatch across ranks
raises on every rank), and ``close``. With ``graph=True`` on a GPU
communicator it also captures all-reduces and send/recv in CUDA graphs and
replays them, and checks that work goes on the caller's current stream. A
communicator that does only send/recv (or only collectives) skips what it
does not do. A failed check raises :class:`ConformanceError` naming the
check, the rank and the first wrong element.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..communicator.api import Collective, Communicator, DeviceType, DType, ReduceOp, communicators
from ..errors import CommunicatorError, ConfigError
from . import _gpu_checks
from ._arrays import AVG_TOLERANCE, TORCH_DTYPES, InterfaceOnly, Library, expected, pattern, shape_numel

__all__ = ["ConformanceError", "ConformanceReport", "DEFAULT_SHAPES", "launch_conformance",
           "run_conformance"]

DEFAULT_SHAPES = ((0,), (1,), (7,), (1023,), (3, 5, 7), (4096,))

CommunicatorSpec = Union[str, type, Callable[..., Communicator]]


class ConformanceError(AssertionError):
    """A communicator did not behave as the Communicator contract says."""


@dataclass(frozen=True)
class ConformanceReport:
    """One rank's outcome: the checks that passed, and those skipped with why."""

    communicator: str
    rank: int
    world_size: int
    library: str
    passed: tuple
    skipped: tuple   # of (check, reason)
    declined: tuple = ()  # cases the communicator's limits declined (can_all_reduce gave a reason)


def run_conformance(communicator: CommunicatorSpec, *, coordinator=None, device: Any = None,
                    library: str = "torch", shapes: Sequence[tuple] = DEFAULT_SHAPES,
                    graph: bool = False) -> ConformanceReport:
    """Run the suite in this rank (every rank of the launch must call it alike).

    ``coordinator`` and ``device`` default to ``distrib.init()``'s; ``library``
    is "torch", "cupy" or "cuda_array_interface" (GPU communicators only for
    the last two).
    """
    if coordinator is None or device is None:
        from ..runtime import init

        context = init()
        coordinator = coordinator if coordinator is not None else context.coordinator
        device = device if device is not None else context.device
    suite = _Suite(_factory(communicator), coordinator, device, library, tuple(shapes))
    return suite.run(graph)


def launch_conformance(communicator: CommunicatorSpec, nprocs: int, *, devices: Any = "cpu",
                       share_gpu: bool = False, start_method: str = "spawn",
                       timeout: Optional[float] = 300.0, **options: Any) -> list[ConformanceReport]:
    """Launch ``nprocs`` ranks with :func:`distrib.launch` and run the suite in each.

    ``devices`` and ``share_gpu`` are :func:`distrib.launch`'s.
    """
    from ..launcher import launch

    return launch(_conformance_worker, nprocs, args=(communicator,), kwargs=options,
                  devices=devices, share_gpu=share_gpu, start_method=start_method, timeout=timeout)


def _conformance_worker(communicator: CommunicatorSpec, **options: Any) -> ConformanceReport:
    return run_conformance(communicator, **options)


def _factory(spec: CommunicatorSpec) -> Callable[..., Communicator]:
    if isinstance(spec, str):
        return communicators.get(spec)
    if callable(spec):
        return spec
    raise ConfigError(f"expected a communicator name, class or factory, got {type(spec).__name__}")


class _Suite:
    def __init__(self, factory, coordinator, device, library: str, shapes: tuple):
        self.factory, self.coordinator, self.shapes = factory, coordinator, shapes
        self.comm: Communicator = factory(coordinator, device, debug=False)
        self.rank, self.ws = self.comm.rank, self.comm.world_size
        self.gpu = self.comm.device_type is DeviceType.CUDA
        self.device = self.comm.device if self.gpu else None
        self.lib = Library(library, self.device)
        self.dtypes = [d for d in DType if d in self.comm.dtypes and self.lib.unsupported_reason(d) is None]
        self.ops = [o for o in ReduceOp if o in self.comm.ops]
        self.check = ""
        self.declined: list[str] = []
        self.reduces = self.comm.supports(Collective.ALL_REDUCE)
        self.p2p = self.comm.supports(Collective.SEND) and self.comm.supports(Collective.RECV)
        if not self.dtypes or (self.reduces and ReduceOp.SUM not in self.ops) or not (self.reduces or self.p2p):
            self.fail(f"declares dtypes {sorted(self.comm.dtypes)} and ops {sorted(self.comm.ops)}; "
                      "the suite needs at least one dtype, and all_reduce with the sum op or send/recv")

    def run(self, graph: bool) -> ConformanceReport:
        checks = [self.check_all_reduce, self.check_all_reduce_out, self.check_all_gather,
                  self.check_reduce_scatter, self.check_broadcast, self.check_send_recv,
                  self.check_can_all_reduce, self.check_bad_inputs, self.check_debug_mode]
        if graph:
            checks += [self.check_cuda_graph, self.check_send_recv_graph, self.check_caller_stream]
        checks.append(self.check_close)
        passed, skipped = [], []
        for check in checks:
            self.check = check.__name__[len("check_"):]
            skip_reason = check()
            if skip_reason:
                skipped.append((self.check, skip_reason))
            else:
                passed.append(self.check)
        return ConformanceReport(self.comm.name, self.rank, self.ws, self.lib.name, tuple(passed),
                                 tuple(skipped), tuple(self.declined))

    # -- helpers ------------------------------------------------------------------
    def fail(self, message: str):
        raise ConformanceError(f"[{self.check}] {self.comm.name}, rank {self.rank}/{self.ws}, "
                               f"{self.lib.name} arrays: {message}")

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def raises(self, kind: type[BaseException], words: Sequence[str], what: str, fn: Callable,
               *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except kind as exc:
            text = str(exc).lower()
            missing = [w for w in words if w.lower() not in text]
            self.expect(not missing, f"{what}: the message {str(exc)!r} does not mention {missing}")
            return exc
        except Exception as exc:  # noqa: BLE001 — the wrong kind of error is the finding
            self.fail(f"{what}: raised {type(exc).__name__}: {exc}; expected {kind.__name__}")
        self.fail(f"{what}: did not raise; expected {kind.__name__}")

    def make(self, op: ReduceOp, rank: int, shape: tuple, dtype: DType, shift: int = 0):
        return self.lib.make(pattern(op, rank, self.ws, shape_numel(shape), dtype) + shift, shape, dtype)

    def compare(self, array, want, dtype: DType, shape: tuple, what: str, tolerance: float = 0.0) -> None:
        got = self.lib.to_torch(array)
        self.expect(tuple(got.shape) == tuple(shape), f"{what}: shape {list(got.shape)}, expected {list(shape)}")
        got = got.reshape(-1)
        if tolerance:
            wrong = ~torch.isclose(got.double(), want, rtol=tolerance, atol=tolerance)
        else:
            wrong = got != want.to(TORCH_DTYPES[dtype])
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            self.fail(f"{what}: element {i} is {got[i].item()}, expected {want[i].item()} "
                      f"({int(wrong.sum())} of {got.numel()} elements wrong)")

    def compare_reduced(self, array, op: ReduceOp, dtype: DType, shape: tuple, what: str) -> None:
        tolerance = AVG_TOLERANCE.get(dtype, 0.0) if op is ReduceOp.AVG else 0.0
        self.compare(array, expected(op, self.ws, shape_numel(shape), dtype), dtype, shape, what, tolerance)

    def accepts(self, x, op: ReduceOp, what: str) -> bool:
        """Whether the communicator takes ``x``; a decline must be an error from all_reduce too."""
        reason = self.comm.can_all_reduce(x, op)
        if reason is None:
            return True
        self.raises(CommunicatorError, [], f"{what}, declined by can_all_reduce ({reason})",
                    self.comm.all_reduce, x, op)
        self.declined.append(f"{what}: {reason}")
        return False

    def cases(self):
        for dtype in self.dtypes:
            for op in self.ops:
                if op is ReduceOp.AVG and not dtype.is_floating_point:
                    continue
                yield dtype, op

    def no_all_reduce(self) -> Optional[str]:
        return None if self.reduces else f"all_reduce is not supported by {self.comm.name}"

    # -- checks -------------------------------------------------------------------
    def check_all_reduce(self):
        if not self.reduces:
            return self.no_all_reduce()
        for dtype, op in self.cases():
            for shape in self.shapes:
                x = self.make(op, self.rank, shape, dtype)
                if not self.accepts(x, op, f"all_reduce {op} {dtype}{list(shape)}"):
                    continue
                result = self.comm.all_reduce(x, op)
                self.expect(result is x, f"in-place all_reduce returned {type(result).__name__}, not its input")
                self.compare_reduced(x, op, dtype, shape, f"all_reduce {op} {dtype}{list(shape)}")

    def check_all_reduce_out(self):
        if not self.reduces:
            return self.no_all_reduce()
        shape = (4, 8)
        for dtype, op in self.cases():
            x = self.make(op, self.rank, shape, dtype)
            if not self.accepts(x, op, f"all_reduce {op} {dtype}{list(shape)} with out"):
                continue
            before = self.lib.to_torch(x).clone()
            out = self.lib.empty(shape, dtype)
            result = self.comm.all_reduce(x, op.value.upper(), out=out)  # op names in any case
            self.expect(result is out, "all_reduce(out=...) did not return out")
            self.compare_reduced(out, op, dtype, shape, f"all_reduce {op} {dtype} into out")
            self.expect(torch.equal(self.lib.to_torch(x), before), "all_reduce(out=...) changed its input")
        x = self.make(ReduceOp.SUM, self.rank, shape, self.dtypes[0])
        if not self.accepts(x, ReduceOp.SUM, "all_reduce(x, out=x)"):
            return None
        self.expect(self.comm.all_reduce(x, out=x) is x, "all_reduce(x, out=x) did not return x")
        self.compare_reduced(x, ReduceOp.SUM, self.dtypes[0], shape, "all_reduce(x, out=x)")

    def check_all_gather(self):
        if not self.comm.supports(Collective.ALL_GATHER):
            return f"all_gather is not supported by {self.comm.name}"
        for dtype in self.dtypes:
            for shape in self.shapes:
                n = shape_numel(shape)
                x = self.make(ReduceOp.SUM, self.rank, shape, dtype)
                want = torch.cat([pattern(ReduceOp.SUM, r, self.ws, n, dtype) for r in range(self.ws)])
                result = self.comm.all_gather(x)
                self.expect(_same_library(result, x), f"all_gather returned a {type(result).__name__}")
                self.compare(result, want, dtype, (self.ws,) + shape, f"all_gather {dtype}{list(shape)}")
                out = self.lib.empty((self.ws * n,), dtype)
                self.expect(self.comm.all_gather(x, out=out) is out, "all_gather(out=...) did not return out")
                self.compare(out, want, dtype, (self.ws * n,), f"all_gather {dtype}{list(shape)} into out")

    def check_reduce_scatter(self):
        if not self.comm.supports(Collective.REDUCE_SCATTER):
            return f"reduce_scatter is not supported by {self.comm.name}"
        for dtype, op in self.cases():
            for per_rank in ((0,), (1,), (7,), (3, 5)):
                shape = (self.ws * per_rank[0],) + per_rank[1:]
                x = self.make(op, self.rank, shape, dtype)
                whole = expected(op, self.ws, shape_numel(shape), dtype).view(self.ws, -1)[self.rank]
                tolerance = AVG_TOLERANCE.get(dtype, 0.0) if op is ReduceOp.AVG else 0.0
                result = self.comm.reduce_scatter(x, op)
                self.compare(result, whole, dtype, per_rank, f"reduce_scatter {op} {dtype}{list(shape)}", tolerance)
                out = self.lib.empty((shape_numel(per_rank),), dtype)
                self.expect(self.comm.reduce_scatter(x, op, out=out) is out, "reduce_scatter(out=...) did not return out")
                self.compare(out, whole, dtype, (shape_numel(per_rank),), f"reduce_scatter {op} {dtype} into out", tolerance)
        # A first dimension that does not divide: a flat result.
        shape = (1, self.ws * 3)
        result = self.comm.reduce_scatter(self.make(ReduceOp.SUM, self.rank, shape, self.dtypes[0]))
        whole = expected(ReduceOp.SUM, self.ws, shape_numel(shape), self.dtypes[0]).view(self.ws, -1)[self.rank]
        self.compare(result, whole, self.dtypes[0], (3,) if self.ws > 1 else (1, 3), "reduce_scatter of shape (1, 3n)")

    def check_broadcast(self):
        if not self.comm.supports(Collective.BROADCAST):
            return f"broadcast is not supported by {self.comm.name}"
        for dtype in self.dtypes:
            for src in range(self.ws):
                for shape in self.shapes:
                    x = self.make(ReduceOp.SUM, self.rank, shape, dtype)
                    self.expect(self.comm.broadcast(x, src) is x, "broadcast did not return its input")
                    want = pattern(ReduceOp.SUM, src, self.ws, shape_numel(shape), dtype)
                    self.compare(x, want, dtype, shape, f"broadcast from {src} of {dtype}{list(shape)}")

    def check_send_recv(self):
        comm = self.comm
        if not self.p2p:
            return f"send/recv is not supported by {comm.name}"
        if self.ws == 1:
            return "send/recv needs at least 2 ranks"
        after, before = (self.rank + 1) % self.ws, (self.rank - 1) % self.ws
        for dtype in self.dtypes:
            for shape in self.shapes:
                x = self.make(ReduceOp.SUM, self.rank, shape, dtype)
                got = self.lib.empty(shape, dtype)
                self._ring(lambda: comm.send(x, after), lambda: self.expect(
                    comm.recv(got, before) is got, "recv did not return its tensor"))
                want = pattern(ReduceOp.SUM, before, self.ws, shape_numel(shape), dtype)
                self.compare(got, want, dtype, shape, f"send/recv of {dtype}{list(shape)} from rank {before}")
        x = self.make(ReduceOp.SUM, self.rank, (4,), self.dtypes[0])
        self.raises(CommunicatorError, ["itself"], "a send to this rank", comm.send, x, self.rank)
        self.raises(CommunicatorError, ["not a rank"], "a recv from a rank out of range", comm.recv, x, self.ws)
        self.raises(CommunicatorError, ["contiguous"], "a non-contiguous send", comm.send,
                    self.lib.non_contiguous(self.dtypes[0]), after)
        if self.lib.name != "torch":
            return None
        tensors = {"a": self.make(ReduceOp.SUM, self.rank, (3, 5), self.dtypes[0]),
                   "strided": self.make(ReduceOp.SUM, self.rank, (4, 2), self.dtypes[-1]).t(),
                   "step": self.rank, "names": ["x", "y"]}
        received: dict = {}
        self._ring(lambda: comm.send_tensor_dict(tensors, after),
                   lambda: received.update(comm.recv_tensor_dict(before)))
        self.expect(list(received) == list(tensors) and received["step"] == before
                    and received["names"] == ["x", "y"],
                    f"recv_tensor_dict gave keys {list(received)} and values {received.get('step')!r}, "
                    f"{received.get('names')!r}")
        for key in ("a", "strided"):
            want = self.make(ReduceOp.SUM, before, (3, 5) if key == "a" else (4, 2),
                             self.dtypes[0] if key == "a" else self.dtypes[-1])
            want = want if key == "a" else want.t()
            self.expect(received[key].device == want.device and torch.equal(received[key].cpu(), want.cpu()),
                        f"recv_tensor_dict[{key!r}] differs from what rank {before} sent")

    def _ring(self, send: Callable[[], Any], recv: Callable[[], Any]) -> Any:
        """Send to the next rank and receive from the previous one: even ranks send first."""
        first, second = (send, recv) if self.rank % 2 == 0 else (recv, send)
        first()
        second()

    def check_can_all_reduce(self):
        if not self.reduces:
            return self.no_all_reduce()
        good = self.make(ReduceOp.SUM, self.rank, (16,), self.dtypes[0])
        self.expect(self.comm.can_all_reduce(good) is None, f"rejects a good tensor: {self.comm.can_all_reduce(good)}")
        self.expect(self.comm.can_all_reduce(good, "SUM") is None, "rejects op 'SUM'")
        for bad, op, word in [(self.lib.non_contiguous(self.dtypes[0]), "sum", "contiguous"),
                              ([1.0, 2.0], "sum", "expected"), (None, "sum", "expected"),
                              (good, "median", "unknown reduce op"), (self._wrong_device(), "sum", "")]:
            try:
                reason = self.comm.can_all_reduce(bad, op)
            except Exception as exc:  # noqa: BLE001
                self.fail(f"can_all_reduce raised {type(exc).__name__}: {exc}; it must return a reason")
            self.expect(isinstance(reason, str) and word in reason,
                        f"can_all_reduce({type(bad).__name__}, {op!r}) gave {reason!r}; expected a reason mentioning {word!r}")

    def check_bad_inputs(self):
        if not self.reduces:
            return f"{self.no_all_reduce()} (check_send_recv checks bad sends and recvs)"
        comm, dtype = self.comm, self.dtypes[0]
        x = self.make(ReduceOp.SUM, self.rank, (6, 4), dtype)
        self.raises(CommunicatorError, ["contiguous"], "a non-contiguous tensor",
                    comm.all_reduce, self.lib.non_contiguous(dtype))
        self.raises(CommunicatorError, ["list"], "a list", comm.all_reduce, [1.0, 2.0])
        self.raises(CommunicatorError, ["nonetype"], "None", comm.all_reduce, None)
        self.raises(ConfigError, ["median"], "an unknown op name", comm.all_reduce, x, "median")
        self.raises(CommunicatorError, ["dtype", "bool"], "a bool tensor", comm.all_reduce, self._bool_array())
        for op in ReduceOp:
            if op not in comm.ops:
                self.raises(CommunicatorError, ["op", op.value], f"unsupported op {op}", comm.all_reduce, x, op)
        integer = next((d for d in self.dtypes if not d.is_floating_point), None)
        if ReduceOp.AVG in comm.ops and integer is not None:
            self.raises(CommunicatorError, ["avg", "floating"], "avg of integers", comm.all_reduce,
                        self.make(ReduceOp.SUM, self.rank, (4,), integer), ReduceOp.AVG)
        self.raises(CommunicatorError, [], "a tensor on the wrong device", comm.all_reduce, self._wrong_device())
        self.raises(CommunicatorError, ["out", "shape"], "an out of another shape", comm.all_reduce, x,
                    out=self.lib.empty((4, 6), dtype))
        other = next((d for d in self.dtypes if d is not dtype), None)
        if other is not None:
            self.raises(CommunicatorError, ["out", "dtype"], "an out of another dtype", comm.all_reduce, x,
                        out=self.lib.empty((6, 4), other))
        self.raises(CommunicatorError, ["out", "contiguous"], "a non-contiguous out", comm.all_reduce,
                    self.make(ReduceOp.SUM, self.rank, (6, 4), dtype), out=self.lib.non_contiguous(dtype))
        if self.lib.name != "cuda_array_interface":
            buffer = self.make(ReduceOp.SUM, self.rank, (16,), dtype)
            self.raises(CommunicatorError, ["overlaps"], "an out overlapping the input", comm.all_reduce,
                        buffer[:8], out=buffer[4:12])
        if comm.supports(Collective.REDUCE_SCATTER) and self.ws > 1:
            self.raises(CommunicatorError, ["divisible"], "reduce_scatter of an indivisible size",
                        comm.reduce_scatter, self.make(ReduceOp.SUM, self.rank, (2 * self.ws + 1,), dtype))
        if comm.supports(Collective.ALL_GATHER):
            self.raises(CommunicatorError, ["out", "elements"], "all_gather into a short out",
                        comm.all_gather, x, out=self.lib.empty((24 * self.ws + 1,), dtype))
        if comm.supports(Collective.BROADCAST):
            for src in (self.ws, -1):
                self.raises(CommunicatorError, ["src"], f"broadcast from rank {src}", comm.broadcast, x, src)
        # None of that may have sent anything, nor broken the communicator.
        x = self.make(ReduceOp.SUM, self.rank, (6, 4), dtype)
        comm.all_reduce(x)
        self.compare_reduced(x, ReduceOp.SUM, dtype, (6, 4), "all_reduce after the bad inputs")

    def check_debug_mode(self):
        if self.ws == 1:
            return "mismatches across ranks need at least 2 ranks"
        dtype = self.dtypes[0]
        # Messages name global ranks (the same as these outside groups).
        first, second = (f"rank {r}" for r in getattr(self.coordinator, "ranks", range(self.ws))[:2])
        with self.factory(self.coordinator, self.device, debug=True) as debug:
            self.expect(debug.debug, "debug=True did not turn debug mode on")
            if self.reduces:
                self._debug_all_reduce(debug, dtype, first, second)
            if self.p2p and self.rank < 2:
                peer = 1 - self.rank
                call = debug.send if self.rank == 0 else debug.recv
                self.raises(CommunicatorError, ["does not match", first, second],
                            "a send and a recv of different sizes", call,
                            self.lib.empty((4 + self.rank,), dtype), peer)
        previous = os.environ.get("DISTRIB_DEBUG")
        os.environ["DISTRIB_DEBUG"] = "1"
        try:
            with self.factory(self.coordinator, self.device, debug=None) as from_env:
                self.expect(from_env.debug, "DISTRIB_DEBUG=1 did not turn debug mode on")
        finally:
            if previous is None:
                os.environ.pop("DISTRIB_DEBUG", None)
            else:
                os.environ["DISTRIB_DEBUG"] = previous

    def _debug_all_reduce(self, debug, dtype: DType, first: str, second: str) -> None:
        mine = self.make(ReduceOp.SUM, self.rank, (8 * (1 + self.rank),), dtype)
        self.raises(CommunicatorError, ["differ", first, second], "sizes that differ across ranks",
                    debug.all_reduce, mine)
        if len(self.dtypes) > 1:
            mine = self.make(ReduceOp.SUM, self.rank, (8,), self.dtypes[self.rank % 2])
            self.raises(CommunicatorError, ["differ"], "dtypes that differ across ranks", debug.all_reduce, mine)
        if ReduceOp.MAX in self.ops:
            op = ReduceOp.SUM if self.rank == 0 else ReduceOp.MAX
            self.raises(CommunicatorError, ["differ"], "ops that differ across ranks", debug.all_reduce,
                        self.make(ReduceOp.SUM, self.rank, (8,), dtype), op)
        if self.rank == 0:
            self.raises(CommunicatorError, ["contiguous"], "a bad input on rank 0", debug.all_reduce,
                        self.lib.non_contiguous(dtype))
        else:
            self.raises(CommunicatorError, [first, "rejected"], "a bad input on rank 0 (seen from a peer)",
                        debug.all_reduce, self.make(ReduceOp.SUM, self.rank, (6, 4), dtype))
        x = self.make(ReduceOp.SUM, self.rank, (8,), dtype)
        debug.all_reduce(x)
        self.compare_reduced(x, ReduceOp.SUM, dtype, (8,), "a matching all_reduce in debug mode")

    def check_cuda_graph(self):
        if not self.reduces:
            return self.no_all_reduce()
        return _gpu_checks.cuda_graph(self)

    def check_send_recv_graph(self):
        if not self.p2p:
            return f"send/recv is not supported by {self.comm.name}"
        return _gpu_checks.send_recv_graph(self)

    def check_caller_stream(self):
        return _gpu_checks.caller_stream(self)

    def check_close(self):
        with self.factory(self.coordinator, self.device, debug=False) as extra:
            self._exchange(extra, "in a with block")
        self.expect(extra.closed, "leaving the with block did not close the communicator")
        self.comm.close()
        self.comm.close()  # idempotent
        self.expect(self.comm.closed, "close() did not mark the communicator closed")
        x = self.make(ReduceOp.SUM, self.rank, (8,), self.dtypes[0])
        call = self.comm.all_reduce if self.reduces else (lambda t: self.comm.send(t, (self.rank + 1) % self.ws))
        self.raises(CommunicatorError, ["closed"], "a call after close", call, x)
        reason = self.comm.can_all_reduce(x)
        self.expect(isinstance(reason, str) and "closed" in reason, f"can_all_reduce after close gave {reason!r}")

    def _exchange(self, comm, what: str) -> None:
        """One all_reduce on ``comm`` (or, without it, a send/recv ring), checked."""
        dtype = self.dtypes[0]
        x = self.make(ReduceOp.SUM, self.rank, (8,), dtype)
        if self.reduces:
            comm.all_reduce(x)
            self.compare_reduced(x, ReduceOp.SUM, dtype, (8,), f"all_reduce {what}")
            return
        after, before = (self.rank + 1) % self.ws, (self.rank - 1) % self.ws
        got = self.lib.empty((8,), dtype)
        self._ring(lambda: comm.send(x, after), lambda: comm.recv(got, before))
        self.compare(got, pattern(ReduceOp.SUM, before, self.ws, 8, dtype), dtype, (8,), f"send/recv {what}")

    # -- arrays the suite needs ------------------------------------------------------
    def _wrong_device(self):
        if not self.gpu:
            return torch.empty(4, device="meta")
        count = torch.cuda.device_count()
        assert self.device is not None  # a GPU communicator has its device
        if count > 1:
            return torch.zeros(4, device=torch.device("cuda", (self.device + 1) % count))
        return torch.empty(4, device="meta")  # (a CPU tensor is right for a dispatcher with gloo)

    def _bool_array(self):
        if self.lib.name == "cupy":
            import cupy

            with cupy.cuda.Device(self.device):
                return cupy.zeros(4, dtype=bool)
        tensor = torch.zeros(4, dtype=torch.bool, device=self.lib.torch_device)
        return InterfaceOnly(tensor) if self.lib.name == "cuda_array_interface" else tensor


def _same_library(result: Any, like: Any) -> bool:
    if isinstance(like, torch.Tensor):
        return isinstance(result, torch.Tensor)
    return type(result).__module__.startswith("cupy")
