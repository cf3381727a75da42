"""The multiprocessing launcher behind :func:`distrib.launch`.

The launching process binds the rendezvous store's port before any worker
starts (so that it cannot be taken) and hosts the store there, or in a helper
process if torch is not imported yet (see :func:`~distrib._store.one_node_store`:
the launching process never waits for torch), starts one process per rank,
and supervises them: results come back over a pipe per rank, and the first
failure (an exception, a signal, a non-zero exit) tears the others down.

Workers lead their own process groups, so a worker's children go with it
and a terminal's Ctrl-C reaches only the launcher, which stops everything
(then raises KeyboardInterrupt; after SIGTERM it dies of that signal). A stop
reaches a worker whatever it is doing, even one still starting (see
:func:`~distrib.launcher._process.stop_processes`). Workers die with the
launcher even when it is SIGKILLed (PR_SET_PDEATHSIG), and a guardian process
then stops their children and removes the launch's scratch folder.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .._network import loopback_gloo_env
from .._text import rank_list
from ..errors import ConfigError, DistribTimeoutError, LaunchError, WorkerFailedError, WorkerFailure
from ..info import LOCAL_GPUS_VAR, SHARE_GPU_VAR, LaunchInfo
from .api import Launcher, launchers
from ._devices import assign_devices, most_ranks_on_a_gpu, shares_gpus
from ._guardian import Guardian
from ._hangwatch import HangWatch
from ._process import (die_with_parent, record_stop_signals, restore_signals, signal_name,
                       stop_processes)

__all__ = ["MultiprocessingLauncher", "launch"]

Devices = Union[None, str, Sequence[int]]


@launchers.register("multiprocessing")
class MultiprocessingLauncher(Launcher):
    """Runs a Python callable in ``nprocs`` processes on this machine."""

    name = "multiprocessing"

    def __init__(self, start_method: str = "spawn", grace: float = 1.0):
        if start_method == "fork":
            raise ConfigError(
                "start_method='fork' is not supported: the launcher's rendezvous store runs "
                "threads, and forking a process with threads can deadlock the workers. Use "
                "'forkserver' (fastest: torch is imported once, in the fork server) or 'spawn'.")
        if start_method not in mp.get_all_start_methods():
            raise ConfigError(
                f"start_method={start_method!r} is not available here; expected 'spawn' or "
                "'forkserver'")
        self.start_method = start_method
        self.grace = grace

    def run(self, target: Callable, nprocs: int, args: Sequence = (),
            kwargs: Optional[Mapping[str, Any]] = None, *, launch_id: Optional[str] = None,
            timeout: Optional[float] = None, devices: Devices = None, share_gpu: bool = False,
            master_port: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> list[Any]:
        _check_arguments(target, nprocs, timeout, args, kwargs)
        # Ctrl-C/SIGTERM from here on are recorded and acted on in order (below): one that
        # came while torch is imported could otherwise be lost in its C code.
        signals: list[int] = []
        previous_handlers = record_stop_signals(signals)
        store = None
        try:
            device_of = _assign_devices(devices, nprocs, share_gpu)
            launch_id = launch_id or uuid.uuid4().hex
            from .._store import AGENT_STORE_VAR, bind_listener, one_node_store, store_host

            # The port now; the store (torch's) in a helper process while the workers start,
            # unless torch is here already: nothing here waits for torch (see one_node_store).
            listener, port = bind_listener(launch_id, master_port, store_host("127.0.0.1", 1))
            store = one_node_store(listener)
            secret = secrets.token_hex(16)
            ctx = mp.get_context(self.start_method)
            if self.start_method == "forkserver":
                # Workers fork from a server that has imported torch once.
                ctx.set_forkserver_preload(["torch", "torch.distributed", "distrib"])
            workers: list[_Worker] = []
            scratch = tempfile.mkdtemp(prefix="distrib-launch-")
            hangwatch = HangWatch(secret, _note, scratch)
            hangwatch.install_signal()
            mps = None
        except BaseException:
            if store is not None:
                store.close()
            restore_signals(previous_handlers)
            raise
        # A single-node launch talks over loopback only: gloo too (the store and the
        # monitor bind it already), unless the caller chose an interface.
        env = {**loopback_gloo_env(), **(env or {})}
        guardian = None
        try:
            # Kills the workers' children and removes the scratch folder if we are SIGKILLed.
            guardian = Guardian.start()
            guardian.remove_later(scratch)
            shared_env = {}
            if shares_gpus(device_of):
                from ._mps import start_mps

                mps = start_mps(scratch, _note)
                shared_env = {SHARE_GPU_VAR: str(most_ranks_on_a_gpu(device_of)),
                              LOCAL_GPUS_VAR: ",".join(str(d) for d in device_of),
                              **(mps.env if mps else {})}
            for rank in range(nprocs):
                if signals:
                    break
                info = LaunchInfo(launch_id=launch_id, rank=rank, world_size=nprocs,
                                  local_rank=rank, local_world_size=nprocs, node_rank=0,
                                  nnodes=1, master_addr="127.0.0.1", master_port=port,
                                  secret=secret)
                worker_env = {**(env or {}), **info.to_env(), AGENT_STORE_VAR: "True",
                              **hangwatch.worker_env(rank), **shared_env}
                if device_of[rank] is not None:
                    worker_env["DISTRIB_DEVICE"] = str(device_of[rank])
                workers.append(_Worker(ctx, rank, target, tuple(args), dict(kwargs or {}),
                                       worker_env, device_of[rank]))
                workers[-1].start()
                guardian.watch(workers[-1].process.pid)  # its group, once it leads one
                hangwatch.watch(rank, workers[-1].process.pid)
            results = _supervise(workers, timeout, hangwatch, signals, mps, store)
            if signals and signals[0] == signal.SIGINT:
                raise KeyboardInterrupt  # as Python would have, now raised where we stop the ranks
            return results
        finally:
            # Workers first (whatever stage each is in), then what they use: the
            # monitor, the scratch folder their stack files live in, the store.
            stop_processes(workers, grace=self.grace,
                           cut_short=lambda: len(signals) > 1)  # a second Ctrl-C: no grace
            for w in workers:
                w.conn.close()
            hangwatch.close()
            if mps is not None:
                mps.close()  # after the workers, its clients; before the scratch folder its pipes are in
            shutil.rmtree(scratch, ignore_errors=True)
            if guardian is not None:
                guardian.release()
            store.close()
            restore_signals(previous_handlers)
            if signals and signals[0] == signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)  # die of it, as without us, now that ranks are stopped


def launch(fn: Callable, nprocs: int, args: Sequence = (), kwargs: Optional[Mapping[str, Any]] = None,
           *, launch_id: Optional[str] = None, timeout: Optional[float] = None,
           devices: Devices = None, share_gpu: bool = False, start_method: str = "spawn") -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``nprocs`` processes; return their results in rank order.

    Each process can call :func:`distrib.init` for its LaunchInfo and
    Coordinator. ``fn`` must be picklable: a module-level function, also one
    defined in a script's ``__main__`` (keep the ``launch`` call under
    ``if __name__ == "__main__":``).

    - If any rank fails, the others are stopped and :class:`WorkerFailedError`
      names the first failing rank, its exception and its traceback.
    - ``timeout`` (seconds) bounds the whole launch; on expiry
      :class:`DistribTimeoutError` names the ranks still running.
    - ``start_method``: ``"spawn"`` (a fresh interpreter per rank) or
      ``"forkserver"`` (ranks fork from a server that imported torch once,
      much faster to start when ranks import torch).
    - ``devices``: ``None`` gives rank ``r`` GPU ``r`` when GPUs are visible
      (nothing GPU-related is touched on machines without them); a list picks
      the GPUs (``[0, 2]``); ``[]`` or ``"cpu"`` uses none.
    - ``share_gpu``: let ranks share GPUs (``devices=[0, 0, 0, 0]``, or
      ``devices=None`` to spread ``nprocs`` ranks over the visible GPUs), for
      developing multi-GPU code on one GPU. Ranks on a shared GPU all-reduce
      through the custom kernel (NCCL refuses them) under an MPS daemon,
      which the launch starts if none is running.
    """
    return MultiprocessingLauncher(start_method).run(
        fn, nprocs, args, kwargs, launch_id=launch_id, timeout=timeout, devices=devices,
        share_gpu=share_gpu)


# -- parent side --------------------------------------------------------------

class _Worker:
    def __init__(self, ctx, rank, target, args, kwargs, env, device):
        self.rank = rank
        self.result: Any = _NO_RESULT
        self.failure: Optional[WorkerFailure] = None
        self.conn_open = True
        # The target travels pickled and is unpickled by the worker once it leads its
        # group and dies with us: importing its module (which may take seconds, or fail)
        # then happens where a stop reaches it and a failure is reported with its traceback.
        try:
            target_bytes = bytes(ForkingPickler.dumps(target))
        except Exception as exc:
            raise LaunchError(f"could not start rank {rank}: the function cannot be pickled "
                              f"({type(exc).__name__}: {exc}); expected a module-level function") from exc
        self.conn, self._child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, name=f"distrib-rank{rank}", daemon=False,
                                   args=(target_bytes, args, kwargs, env, device, os.getpid(),
                                         self._child_end))

    def start(self) -> None:
        try:
            self.process.start()
        except Exception as exc:
            culprit = _unpicklable_argument(self.process._args[1], self.process._args[2])
            if culprit:
                raise ConfigError(f"{culprit} cannot be pickled ({type(exc).__name__}: {exc}); every "
                                  "argument travels to the ranks pickled: pass something picklable, "
                                  "or make it inside the function") from exc
            raise LaunchError(f"could not start rank {self.rank}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._child_end.close()

    # What stop_processes needs: the pid, and the exit status once it ended (reaping it).
    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    def poll(self) -> Optional[int]:
        return self.process.exitcode if self.process.pid else None

    def read(self) -> None:
        """Take the worker's report, if it sent one."""
        try:
            kind, *payload = self.conn.recv()
        except (EOFError, OSError):
            self.conn_open = False
            return
        except Exception as exc:  # the result could not be unpickled here
            self.failure = WorkerFailure(rank=self.rank, timestamp=time.time(), exc_type="LaunchError",
                                         message=f"its return value could not be unpickled: {exc}")
            return
        if kind == "ok":
            self.result = payload[0]
        else:
            exc_type, message, tb, host = payload
            self.failure = WorkerFailure(rank=self.rank, timestamp=time.time(), exc_type=exc_type,
                                         message=message, traceback=tb, host=host)

    def exited(self) -> None:
        """The process has ended: drain its pipe and explain the exit."""
        self.process.join()
        while self.conn_open and self.conn.poll():
            self.read()
        self.conn_open = False
        if self.failure is not None:
            return
        code = self.process.exitcode
        now = time.time()
        host = socket.gethostname()  # workers run on the launcher's host
        if code is not None and code < 0:
            self.failure = WorkerFailure(rank=self.rank, timestamp=now, signal_name=signal_name(-code),
                                         host=host)
        elif code != 0:
            self.failure = WorkerFailure(rank=self.rank, timestamp=now, exitcode=code, host=host)
        elif self.result is _NO_RESULT:
            self.failure = WorkerFailure(rank=self.rank, timestamp=now, exitcode=0, host=host,
                                         message="exited without returning (os._exit?)")


def _supervise(workers: list[_Worker], timeout: Optional[float], hangwatch: HangWatch,
               signals: list[int], mps=None, store=None) -> list[Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    running = {w.rank: w for w in workers}
    settle_until = None
    while running:
        if signals:
            return []  # the caller stops the ranks, then raises KeyboardInterrupt or dies of SIGTERM
        if store is not None:
            store.check()
        waitables = {}
        for w in running.values():
            waitables[w.process.sentinel] = (w, "exit")
            if w.conn_open:
                waitables[w.conn] = (w, "report")
        remaining = _POLL if deadline is None else max(0.0, min(_POLL, deadline - time.monotonic()))
        ready = mp_connection.wait(list(waitables), timeout=remaining)
        if signals:
            # A Ctrl-C to the terminal's group also reaches workers still starting (not yet
            # leading their own group): their death of it is no failure of theirs.
            return []
        # Reports before exits: a worker's exception explains its exit.
        for obj in sorted(ready, key=lambda o: waitables[o][1] != "report"):
            worker, event = waitables[obj]
            if event == "report":
                worker.read()
            else:
                worker.exited()
                running.pop(worker.rank, None)
        lost = mps.lost() if mps is not None else None
        if lost:
            raise LaunchError(lost)
        failed = [w.failure for w in workers if w.failure is not None]
        if failed and all(f.follows_a_peer for f in failed) and running:
            # A rank that lost a peer: the peer's own death (its exit, or its report) is
            # the root cause, and may be a moment behind on this side of the pipes.
            settle_until = settle_until or time.monotonic() + _SETTLE
            if time.monotonic() < settle_until:
                continue
        if failed:
            raise WorkerFailedError(failed)
        if deadline is not None and not ready and time.monotonic() >= deadline:
            still = sorted(running)
            where = hangwatch.report(f"the launch timed out after {timeout:g}s. Where each rank was:",
                                     still, write=False)
            raise DistribTimeoutError(
                f"launch timed out after {timeout:g}s; {rank_list(still)} {'was' if len(still) == 1 else 'were'} still running "
                "and have been stopped" + (f"\n{where}" if where else ""), missing=still)
        hangwatch.check(set(running), 0.0)
    failed = [w.failure for w in workers if w.failure is not None]
    if failed:  # every rank ended while a lost-peer error waited for its cause
        raise WorkerFailedError(failed)
    return [w.result for w in workers]


_POLL = 0.05  # seconds between looks at the control monitor
_SETTLE = 0.25  # seconds a lost-peer error waits for the failure that caused it


def _note(text: str) -> None:
    """The launcher's own report lines, on stderr."""
    print("\n".join(f"distrib.launch: {line}" for line in text.splitlines()), file=sys.stderr, flush=True)


def _unpicklable_argument(args: Sequence, kwargs: Mapping[str, Any]) -> Optional[str]:
    """``args[1]`` or ``kwargs['lock']``: the first argument that does not pickle, or None."""
    named = [(f"args[{i}]", value) for i, value in enumerate(args)]
    named += [(f"kwargs[{key!r}]", value) for key, value in kwargs.items()]
    for name, value in named:
        try:
            ForkingPickler.dumps(value)
        except Exception:  # noqa: BLE001 — any failure to pickle names the argument
            return name
    return None


def _check_arguments(target, nprocs, timeout, args: Any = (), kwargs: Any = None) -> None:
    if getattr(mp.current_process(), "_inheriting", False):
        raise LaunchError(
            "distrib.launch() was called while a worker process was importing your script. "
            "Put the call under `if __name__ == \"__main__\":` so that workers do not launch again.")
    if not callable(target):
        raise ConfigError(f"fn must be callable, got {type(target).__name__}")
    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise ConfigError(f"nprocs={nprocs!r} is invalid; expected an integer >= 1")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout={timeout!r} is invalid; expected seconds > 0 or None")
    if not isinstance(args, (tuple, list)):
        raise ConfigError(f"args={args!r} must be a tuple or list of fn's positional arguments, e.g. "
                          f"args=({args!r},)")
    if kwargs is not None and (not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs)):
        raise ConfigError(f"kwargs={kwargs!r} must be a dict of fn's keyword arguments by name")


def _assign_devices(devices: Devices, nprocs: int, share_gpu: bool) -> list[Optional[int]]:
    if devices == "cpu":
        if share_gpu:
            raise ConfigError("share_gpu=True with devices='cpu': sharing is for GPUs; drop one of them")
        return [None] * nprocs
    if isinstance(devices, str):
        raise ConfigError(f"devices={devices!r} is invalid; expected None, 'cpu' or a list of GPU indices")
    return assign_devices(None if devices is None else list(devices), nprocs, share_gpu=share_gpu,
                          option=f"devices={list(devices or [])!r}", count="nprocs={n}",
                          no_gpus="devices=[]", share="share_gpu=True")


# -- worker side -----------------------------------------------------------------

_NO_RESULT = object()


def _worker_main(target_bytes, args, kwargs, env, device, parent_pid, conn) -> None:
    os.setpgrp()  # lead a group: the launcher stops this worker and its children together
    die_with_parent(parent_pid)
    os.environ.update(env)
    from ..control import agent

    agent.start()  # heartbeats and stack snapshots for the launcher
    from .. import _fatal

    # A watchdog that ends the process (the custom all-reduce's) reports like an exception.
    _fatal.add_hook(lambda exc_type, message: conn.send(
        ("error", exc_type, message, "", socket.gethostname())))
    code = 0
    try:
        target = pickle.loads(target_bytes)  # imports the function's module, here and now
        if device is not None:
            import torch

            torch.cuda.set_device(device)  # before anything else creates a CUDA context
        result = target(*args, **kwargs)
        message = ("ok", result)
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise LaunchError(f"the return value ({type(result).__name__}) cannot be pickled: {exc}") from exc
        conn.send_bytes(data)
    except SystemExit as exc:
        if exc.code in (None, 0):
            conn.send(("ok", None))
        else:
            code = exc.code if isinstance(exc.code, int) else 1
            _report(conn, exc)
    except BaseException as exc:
        code = 1
        _report(conn, exc)
    finally:
        from ..runtime import shutdown

        shutdown()
        agent.stop()
        conn.close()
    if code:
        sys.exit(code)


def _report(conn, exc: BaseException) -> None:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    try:
        conn.send(("error", name, str(exc), traceback.format_exc(), socket.gethostname()))
    except Exception:
        pass
