"""The subprocess launcher behind ``distrib-run``: a fresh interpreter per worker.

On each node, ``distrib-run`` (this launcher) hosts or joins the launch's
rendezvous store, starts one process per local rank through the bootstrap
(:mod:`distrib.launcher._bootstrap`), relays their output line by line with a
rank prefix, and supervises them:

- the first failure (an exception, a non-zero exit, a signal) stops every
  worker of the launch, on every node, and is reported as the root cause;
- SIGINT or SIGTERM to the launcher is passed to every worker's process
  group; what is still alive after the grace period gets SIGKILL;
- a SIGKILLed launcher takes its workers with it (PR_SET_PDEATHSIG in each
  worker), and a guardian process stops their children too.

Node 0's launcher hosts the store (``TORCHELASTIC_USE_AGENT_STORE=True`` tells
workers, as torchrun does), so a script written for torchrun runs unchanged.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from .._store import BIND_ADDR_VAR
from .._text import rank_list
from ..errors import (ConfigError, CoordinatorError, DistribError, DistribTimeoutError,
                      LaunchError, WorkerFailedError, WorkerFailure)
from ..info import LOCAL_GPUS_VAR, SHARE_GPU_VAR, LaunchInfo
from ._errorfile import ERROR_FILE_VAR, LAUNCHER_PID_VAR, TORCH_ERROR_FILE_VAR, torch_error_file
from ._devices import assign_devices, auto_nprocs, most_ranks_on_a_gpu, shares_gpus
from ._guardian import Guardian
from ._hangwatch import HEARTBEAT_TIMEOUT, HangWatch
from ._output import OutputRelay, write_note
from ._process import record_stop_signals, restore_signals, signal_name
from ._launch_store import LaunchStore
from ._node_link import LinkClient, LinkServer
from ._rendezvous import NodeRendezvous
from ._secret import launch_secret
from ._workers import WorkerProcess, stop_workers
from .api import Command, CommandLauncher, CommandOptions, LaunchInterrupted, launchers

if TYPE_CHECKING:
    from ._mps import MpsDaemon

__all__ = ["SubprocessLauncher"]

_POLL = 0.02              # seconds between looks at the workers
_REMOTE_POLL = 0.25       # seconds between looks at the other nodes
NODE_SILENCE_SLACK = 3.0  # seconds a node may be silent beyond the ranks' heartbeat timeout
_LINK_NEWS = 0.1          # seconds a local failure waits for the node link to tell of a lost node
_FAILURE_LINGER = 10.0    # node 0 keeps the store up this long for other nodes to read a failure


@launchers.register("subprocess")
class SubprocessLauncher(CommandLauncher):
    """Runs a command in ``nprocs`` fresh Python processes per node (``distrib-run``)."""

    name = "subprocess"

    def __init__(self, stdout=None, stderr=None):
        """``stdout``/``stderr``: binary streams for the workers' prefixed output (default: ours)."""
        self._stdout = stdout
        self._stderr = stderr

    def run(self, target: Command, nprocs: Optional[int],
            options: CommandOptions = CommandOptions()) -> list[int]:
        if not isinstance(target, Command):
            raise ConfigError(f"the subprocess launcher runs a Command, got {type(target).__name__}")
        nprocs = auto_nprocs(options.devices) if nprocs is None else nprocs
        if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
            raise ConfigError(f"nprocs={nprocs!r} is invalid; expected an integer >= 1 or auto")
        _check_nodes(options)
        _check_console_filters(options, nprocs)
        device_of = assign_devices(options.devices, nprocs, share_gpu=options.share_gpu,
                                   world_size=nprocs * options.nnodes)
        stdout, stderr = self._stdout or sys.stdout.buffer, self._stderr or sys.stderr.buffer
        signals: list[int] = []
        previous_handlers = record_stop_signals(signals)
        try:
            node = LaunchStore.open(options, lambda: _raise_if_interrupted(signals, "while the nodes were "
                                                                          "meeting; no worker had started"))
            try:
                return _attempts(target, nprocs, options, device_of, stdout, stderr, node, signals)
            finally:
                node.close()
        finally:
            restore_signals(previous_handlers)


def _attempts(command: Command, nprocs: int, options: CommandOptions, device_of: list, stdout, stderr,
              node: LaunchStore, signals: list[int]) -> list[int]:
    """Attempt 0, then a restart after each failure, up to ``options.max_restarts``.

    A restart stops every rank (on every node: they learn of the failure as
    always) and starts them all again, with a fresh rendezvous of the nodes and
    fresh keys in the store (``TORCHELASTIC_RESTART_COUNT`` counts up, and
    torch's ``env://`` init prefixes its keys with it). Ctrl-C and SIGTERM,
    here or on another node, never restart; nor does the loss of node 0's store.
    """
    earlier: list[tuple[int, str]] = []  # (attempt, what ended it)
    note = functools.partial(write_note, stderr)  # distrib-run's lines between attempts
    for attempt in range(options.max_restarts + 1):
        launch = _Launch(command, nprocs, options, device_of, stdout, stderr, node, signals, attempt)
        try:
            codes = launch.run()
        except (WorkerFailedError, CoordinatorError) as exc:
            if not _restartable(exc) or attempt == options.max_restarts:
                if earlier:
                    _attach_attempts(exc, earlier)
                raise
            cause = exc.root_cause.describe() if isinstance(exc, WorkerFailedError) else str(exc)
            earlier.append((attempt, cause))
            note(f"attempt {attempt} failed: {cause}; restarting every rank "
                 f"(restart {attempt + 1} of {options.max_restarts})")
            continue
        if earlier:
            note("\n".join([f"attempts: {len(earlier) + 1}, the last succeeded"] +
                           [f"  attempt {k}: {cause}" for k, cause in earlier] +
                           [f"  attempt {attempt}: succeeded"]))
        return codes
    raise AssertionError("unreachable: the last attempt returns or raises")


def _restartable(exc: Exception) -> bool:
    """Whether a failed attempt may be restarted: not an interruption (here or on another node),
    and not the loss of node 0's store (there is nothing left to meet in)."""
    if isinstance(exc, WorkerFailedError):
        return exc.root_cause.exc_type != INTERRUPTED
    return isinstance(exc, _LostNodes)


def _attach_attempts(exc: Exception, earlier: list[tuple[int, str]]) -> None:
    """The earlier attempts' causes, for the final report (see failure_summary)."""
    if isinstance(exc, WorkerFailedError):
        exc.earlier_attempts = tuple(earlier)
    else:
        exc.args = (str(exc) + "".join(f"\n  attempt {k} failed before: {cause}" for k, cause in earlier),)


def _raise_if_interrupted(signals: list[int], when: str) -> None:
    if signals:
        raise LaunchInterrupted(signals[0], f"received {signal_name(signals[0])} {when}")


def _check_nodes(options: CommandOptions) -> None:
    if options.nnodes < 1:
        raise ConfigError(f"--nnodes {options.nnodes} is invalid; expected an integer >= 1")
    if options.node_rank is None and options.nnodes == 1:
        raise ConfigError("node_rank=None (nodes number themselves) needs several nodes")
    if options.node_rank is not None and not 0 <= options.node_rank < options.nnodes:
        raise ConfigError(f"--node-rank {options.node_rank} is invalid; expected 0 <= node rank < "
                          f"--nnodes {options.nnodes}")
    if options.nnodes > 1 and not options.master_addr:
        raise ConfigError(f"--nnodes {options.nnodes} needs --master-addr (or --rdzv-endpoint): the "
                          "address of node 0, reachable from every node")
    if options.nnodes > 1 and options.master_port is None and not options.launch_id:
        raise ConfigError(
            f"--nnodes {options.nnodes} needs --master-port (or --launch-id, from which the port "
            "is derived), the same on every node, so that the nodes find each other")
    for name in ("grace", "rdzv_timeout"):
        if not getattr(options, name) > 0:
            raise ConfigError(f"{name}={getattr(options, name)!r} is invalid; expected seconds > 0")
    if options.timeout is not None and not options.timeout > 0:
        raise ConfigError(f"timeout={options.timeout!r} is invalid; expected seconds > 0")
    if options.max_restarts < 0:
        raise ConfigError(f"max_restarts={options.max_restarts!r} is invalid; expected an integer >= 0")


def _check_console_filters(options: CommandOptions, nprocs: int) -> None:
    """Ranks named for the console must exist (the world size is known up front when every node
    runs ``nprocs``, as distrib-run's nodes do)."""
    world = nprocs * options.nnodes
    for option, chosen, size, what in (("--show-ranks", options.show_ranks, world, "the launch has"),
                                       ("--local-ranks-filter", options.local_ranks_filter, nprocs,
                                        "each node has local")):
        outside = sorted(r for r in chosen or () if r >= size)
        if outside:
            raise ConfigError(f"{option} names {rank_list(outside)}, but {what} ranks 0-{size - 1}; "
                              "expected ranks in that range")


def _console_filter(options: CommandOptions, offset: int) -> Optional[Callable[[int], bool]]:
    """Which global ranks the console shows: --show-ranks, or --local-ranks-filter on this node."""
    if options.show_ranks is not None:
        return options.show_ranks.__contains__
    if options.local_ranks_filter is not None:
        local = options.local_ranks_filter
        return lambda rank: rank - offset in local
    return None


INTERRUPTED = "distrib.launcher.LaunchInterrupted"  # exc_type of a node's notice that it was interrupted


class _LostNodes(CoordinatorError):
    """Node 0 stopped hearing from other nodes (a restart may meet them again)."""


class _Launch:
    """One node's share of one launch, from the store to the last worker's exit."""

    def __init__(self, command: Command, nprocs: int, options: CommandOptions, device_of: list,
                 stdout, stderr, node: LaunchStore, signals: list[int], attempt: int = 0):
        self.command = command
        self.nprocs = nprocs
        self.options = options
        self.device_of = device_of
        self.stdout, self.stderr = stdout, stderr
        self.multi_node = options.nnodes > 1
        self.node = node
        self.node_rank = node.node_rank
        self.attempt = attempt
        # Each attempt has keys of its own in the store (a restart starts afresh).
        self.launch_id = node.launch_id if attempt == 0 else f"{node.launch_id}.{attempt}"
        self.workers: list[WorkerProcess] = []
        self.signals = signals
        self.relay: Optional[OutputRelay] = None
        self.rendezvous: Optional[NodeRendezvous] = None
        self.link: "Optional[LinkServer | LinkClient]" = None  # node 0's server, or a node's client
        self.hangwatch: Optional[HangWatch] = None
        self.mps: Optional[MpsDaemon] = None
        self.shared_env: dict[str, str] = {}
        self._lost_nodes: set[int] = set()  # nodes whose heartbeat stopped

    # -- the whole launch -----------------------------------------------------
    def run(self) -> list[int]:
        options = self.options
        from .._store import AGENT_STORE_VAR

        self._agent_store_var = AGENT_STORE_VAR
        scratch = tempfile.mkdtemp(prefix="distrib-run-")
        guardian = relay = None
        try:
            if self.multi_node:
                secret, world_size, offset = self._meet()
            else:
                secret, world_size, offset = secrets.token_hex(16), self.nprocs, 0
            show = _console_filter(options, offset)
            if options.log_dir:
                os.makedirs(options.log_dir, exist_ok=True)
            relay = self.relay = OutputRelay(self.stdout, self.stderr, options.log_dir, show,
                                             streams=lambda rank: 3 & ~options.redirects.streams(rank - offset))
            self.hangwatch = HangWatch(secret, relay.note, scratch, options.log_dir,
                                       options.heartbeat_timeout, nodes=self.rendezvous)
            self.hangwatch.install_signal()
            if shares_gpus(self.device_of):
                from ._mps import start_mps

                self.mps = start_mps(scratch, relay.note)
                self.shared_env = {SHARE_GPU_VAR: str(most_ranks_on_a_gpu(self.device_of)),
                                   LOCAL_GPUS_VAR: ",".join(str(d) for d in self.device_of),
                                   **(self.mps.env if self.mps else {})}
            guardian = Guardian.start()
            guardian.remove_later(scratch)
            for local_rank in range(self.nprocs):
                info = LaunchInfo(launch_id=self.launch_id, rank=offset + local_rank,
                                  world_size=world_size, local_rank=local_rank,
                                  local_world_size=self.nprocs, node_rank=self.node_rank,
                                  nnodes=options.nnodes, master_addr=self.node.master_addr,
                                  master_port=self.node.port, secret=secret)
                self._start(info, scratch, relay, guardian)
                if self.signals:
                    break
            return self._supervise()
        finally:
            self._stop(signal.SIGTERM)
            if self.hangwatch is not None:
                self.hangwatch.close()
            if relay is not None:
                relay.close(timeout=5.0)
            if self.mps is not None:
                self.mps.close()  # after the workers, its clients
            self._leave()
            shutil.rmtree(scratch, ignore_errors=True)
            if guardian is not None:
                guardian.release()  # after the folder: a launcher killed before is still covered

    def _start(self, info: LaunchInfo, scratch: str, relay: OutputRelay, guardian: Guardian) -> None:
        options = self.options
        error_file = os.path.join(options.log_dir or scratch, f"rank{info.rank}.error.json")
        for stale in (error_file, torch_error_file(error_file)):
            try:
                os.unlink(stale)  # a record from an earlier launch (or attempt) into the same folder
            except FileNotFoundError:
                pass
        env = dict(os.environ)
        env.update(options.env)
        env.update(info.to_env())
        env.update({self._agent_store_var: "True", LAUNCHER_PID_VAR: str(os.getpid()),
                    ERROR_FILE_VAR: error_file,
                    # As torchrun: the attempt, its bound, and where torch's @record writes.
                    "TORCHELASTIC_RESTART_COUNT": str(self.attempt),
                    "TORCHELASTIC_MAX_RESTARTS": str(options.max_restarts),
                    TORCH_ERROR_FILE_VAR: torch_error_file(error_file)})
        if options.local_addr:
            env[BIND_ADDR_VAR] = options.local_addr
        env.update(self._watch.worker_env(info.rank))
        env.update(self.shared_env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the console as they are printed
        if self.nprocs > 1:
            env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N processes, not N x cores threads
        if self.multi_node and "GLOO_SOCKET_IFNAME" not in env:
            interface = _interface_towards(info.master_addr, info.master_port)
            if interface:
                env["GLOO_SOCKET_IFNAME"] = interface
        self._set_device(env, info.local_rank)
        worker, out_r, err_r = WorkerProcess.start(self.command.bootstrap_argv(), env, info.rank,
                                                   info.local_rank, error_file)
        guardian.watch(worker.pid)
        self._watch.watch(info.rank, worker.pid)
        relay.add(info.rank, out_r, err_r)
        self.workers.append(worker)

    def _set_device(self, env: dict, local_rank: int) -> None:
        device = self.device_of[local_rank]
        if device is None:
            return
        if self.options.devices:
            # Show the chosen GPUs only, in order, so that a script's cuda:LOCAL_RANK is right
            # (with shared GPUs, each once: a repeated index would end CUDA's list there).
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else None
            distinct = list(dict.fromkeys(self.options.devices))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                names[d] if names and d < len(names) else str(d) for d in distinct)
            env["DISTRIB_DEVICE"] = str(distinct.index(device))
        else:
            env["DISTRIB_DEVICE"] = str(device)

    @property
    def _watch(self) -> HangWatch:
        assert self.hangwatch is not None, "the hang watch is made before any worker starts"
        return self.hangwatch

    @property
    def _nodes(self) -> NodeRendezvous:
        assert self.rendezvous is not None, "only a launch on several nodes watches other nodes"
        return self.rendezvous

    # -- supervision ----------------------------------------------------------
    def _supervise(self) -> list[int]:
        options = self.options
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        next_remote = 0.0
        while True:
            self.node.check()
            codes = [w.poll() for w in self.workers]
            # A failure counts once its process has exited (so that its traceback is
            # printed in full); its error record's time still makes it the root cause.
            if any(c not in (None, 0) for c in codes):
                return self._local_failure()
            if self.signals:
                self._interrupted(self.signals[0])
            lost = self.mps.lost() if self.mps is not None else None
            if lost:
                self._stop(signal.SIGTERM)
                raise LaunchError(lost)
            if all(c == 0 for c in codes) and len(codes) == self.nprocs:
                return self._success()
            running = {w.rank for w, c in zip(self.workers, codes) if c is None}
            if deadline is not None and time.monotonic() >= deadline:
                self._watch.report(f"the launch timed out after {options.timeout:g}s. Where each "
                                      "rank is:", running)
                self._stop(signal.SIGTERM)
                raise DistribTimeoutError(
                    f"launch timed out after {options.timeout:g}s; {rank_list(running)} "
                    f"{'was' if len(running) == 1 else 'were'} still running and stopped (where each "
                    "was is printed above)", missing=sorted(running))
            if self.rendezvous is not None and time.monotonic() >= next_remote:
                next_remote = time.monotonic() + _REMOTE_POLL
                self._check_other_nodes()
            self._watch.check(running, _POLL)

    def _success(self) -> list[int]:
        """This node's workers all exited 0; node 0 waits for the others (their workers use its store)."""
        if self.rendezvous is not None:
            self._call_store(self.rendezvous.finish)
            while self.node_rank == 0 and self._call_store(self.rendezvous.pending_nodes):
                if self.signals:
                    raise LaunchInterrupted(self.signals[0], (
                        f"received {signal_name(self.signals[0])} while waiting for the other nodes "
                        "to finish"))
                self._check_other_nodes()
                time.sleep(_REMOTE_POLL)
        return [0] * self.nprocs

    def _local_failure(self):
        """A local worker failed: tell the other nodes, stop everything, report.

        A worker that failed because a node was lost (its connections to that
        node's ranks, or to node 0's store, broke) is not the root cause: the
        lost node is, and the link tells of it at once, so it gets a moment to.
        """
        time.sleep(_POLL)  # let ranks failing at the same moment show up before the teardown
        if self.link is not None:
            news_by = time.monotonic() + _LINK_NEWS
            while True:
                self._check_link()
                if time.monotonic() >= news_by:
                    break
                time.sleep(_POLL)
        teardown = time.time()
        if self.rendezvous is not None:
            failures = self._failures(teardown)
            root = min(failures, key=lambda f: (f.timestamp, f.rank))
            self._call_store(lambda: self._nodes.report_failure(root), quiet=True)
        self._stop(signal.SIGTERM)
        raise WorkerFailedError(self._failures(teardown))

    def _meet(self) -> tuple[str, int, int]:
        """The nodes meet: ``(secret, world size, this node's first rank)``.

        Every node derives the launch secret on its own (nothing secret is in
        the store); node 0 opens its node link first, and says where in its record.
        """
        from .._store import store_host

        options = self.options
        secret, where = launch_secret(self.launch_id)
        self.rendezvous = NodeRendezvous(self.node.store, self.launch_id, options.nnodes, self.node_rank,
                                         secret, where, note=functools.partial(write_note, self.stderr))
        # A node silent this long is lost: the ranks' heartbeat timeout, plus slack for a busy host.
        silence = (options.heartbeat_timeout or HEARTBEAT_TIMEOUT) + NODE_SILENCE_SLACK
        endpoint = ""
        if self.node_rank == 0:
            server = self.link = LinkServer(secret, options.local_addr or store_host(self.node.master_addr,
                                                                                     options.nnodes),
                                            self.node.master_addr, options.nnodes, silence)
            endpoint = server.endpoint
        plan = self.rendezvous.join(self.nprocs, options.rdzv_timeout, link=endpoint,
                                    should_stop=self._stop_requested)
        if self.node_rank != 0:
            try:
                self.link = LinkClient(secret, plan.link, self.node_rank, silence)
            except OSError as exc:
                raise CoordinatorError(f"node {self.node_rank} could not open its node link to node 0 at "
                                       f"{plan.link}: {exc}") from exc
        return secret, plan.world_size, plan.rank_offset

    def _check_other_nodes(self) -> None:
        self._check_link()
        for number, node, reason in self._call_store(self._nodes.report_requests):
            running = {w.rank for w in self.workers if w.poll() is None}
            self._watch.asked_by(number, node, reason, running)
        remote = self._call_store(self._nodes.remote_failures)
        if remote:
            teardown = time.time()
            self._stop(signal.SIGTERM)
            raise WorkerFailedError(remote + self._failures(teardown))
        if isinstance(self.link, LinkClient):
            self._lose(self._call_store(self._nodes.lost_nodes))  # what node 0 saw

    def _check_link(self) -> None:
        """Stop this node's workers and raise if this node's link has lost a node."""
        gone = self._node0_gone()
        if gone is not None:
            self._stop(signal.SIGTERM)
            raise CoordinatorError(f"lost {self._describe_node(0)}: {gone}; stopped this node's workers")
        if isinstance(self.link, LinkServer):
            lost = self.link.lost()
            for node, why in lost.items():  # for the other nodes, which have no link to that one
                self._call_store(lambda: self._nodes.report_lost(node, why), quiet=True)
            self._lose(lost)

    def _lose(self, lost: dict[int, str]) -> None:
        if lost:
            self._lost_nodes.update(lost)
            self._stop(signal.SIGTERM)
            raise _LostNodes("lost " + "; ".join(f"{self._describe_node(k)}: {why}" for k, why in lost.items())
                             + "; stopped this node's workers")

    def _describe_node(self, node: int) -> str:
        plan = self._nodes.plan
        return plan.describe_node(node) if plan is not None else f"node {node}"

    def _call_store(self, fn, quiet: bool = False):
        """A store operation; losing node 0 (or its store) stops this node's workers.

        The call runs on a helper thread: a store client waits without end on a
        node 0 that is stopped rather than gone, while the node link notices
        the silence; whichever comes first decides.
        """
        box: dict = {}

        def call() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        helper = threading.Thread(target=call, name="distrib-store-call", daemon=True)
        helper.start()
        while helper.is_alive():
            helper.join(_POLL * 5)
            gone = self._node0_gone()
            if gone is not None and helper.is_alive():
                if quiet:
                    return None
                self._stop(signal.SIGTERM)
                raise CoordinatorError(f"lost {self._describe_node(0)}: {gone}; stopped this node's workers")
        exc = box.get("error")
        if exc is None:
            return box.get("value")
        if isinstance(exc, DistribError):
            raise exc
        if quiet:
            return None
        time.sleep(_LINK_NEWS)  # a store that broke because node 0 died: the link says so, better
        self._check_link()
        self._stop(signal.SIGTERM)
        raise CoordinatorError(
            f"node {self.node_rank} lost the rendezvous store on node 0 "
            f"({self.options.master_addr}): {exc}. Node 0's distrib-run has probably exited or "
            "was killed; stopped this node's workers.") from exc

    def _node0_gone(self) -> Optional[str]:
        """Why node 0 counts as lost, seen from another node's link (None on node 0, or while it lives)."""
        if isinstance(self.link, LinkClient):
            return self.link.lost()
        return None

    def _failures(self, teardown: float) -> list[WorkerFailure]:
        """Workers that failed on their own.

        Every worker that left an error record counts, even one that raised
        while being stopped (its later timestamp keeps it from being the root
        cause); a worker that died of a signal or exit code without a record
        counts only if that happened before ``teardown``, when we began to stop
        the workers ourselves.
        """
        found = []
        for w in self.workers:
            w.poll()
            failure = w.failure()
            if failure is None:
                continue
            if w.has_record() or (w.exit_time is not None and w.exit_time <= teardown):
                found.append(self._explained(failure))
        return found

    def _explained(self, failure: WorkerFailure) -> WorkerFailure:
        """A rank that gloo aborted (SIGABRT after its 'size doesn't match') is said to be so."""
        if failure.signal_name != "SIGABRT" or self.relay is None:
            return failure
        tail = "\n".join(self.relay.tail(failure.rank))
        if "gloo" not in tail:
            return failure
        import dataclasses

        mismatch = "doesn't match expected size" in tail or "size mismatch" in tail.lower()
        what = ("gloo aborted it: ranks called a collective with different sizes" if mismatch
                else "gloo aborted it (its message is above)")
        return dataclasses.replace(failure, message=f"{what}; run with DISTRIB_DEBUG=1 to compare every call "
                                                    "across ranks first, naming each rank's shape")

    def _interrupted(self, signum: int) -> None:
        running = [w.rank for w in self.workers if w.poll() is None]
        if self.rendezvous is not None:
            notice = WorkerFailure(rank=self.workers[0].rank if self.workers else 0,
                                   timestamp=time.time(), exc_type=INTERRUPTED,
                                   message=f"distrib-run on node {self.node_rank} was "
                                           f"interrupted by {signal_name(signum)}")
            self._call_store(lambda: self.rendezvous.report_failure(notice), quiet=True)
        self._stop(signum)
        raise LaunchInterrupted(signum, (
            f"received {signal_name(signum)}; passed it to {rank_list(running) if running else 'no rank'} "
            "and stopped them"))

    # -- stopping -------------------------------------------------------------
    def _stop(self, first_signal: int) -> None:
        """Stop every worker (see stop_workers); a further signal to us cuts the grace short."""
        asked = max(len(self.signals), 1)
        stop_workers(self.workers, first_signal, self.options.grace,
                     cut_short=lambda: len(self.signals) > asked)

    def _leave(self) -> None:
        """Tell the other nodes this node is done; node 0 waits briefly for them to read it."""
        if self.rendezvous is None:
            return
        try:
            if self._node0_gone() is not None:
                return  # node 0 is not there to read anything (and its store may not answer)
            self.rendezvous.finish()
            if self.node_rank == 0:
                # Not for nodes already lost: nobody is there to read anything.
                deadline = time.monotonic() + _FAILURE_LINGER + self.options.grace
                while (set(self.rendezvous.pending_nodes()) - self._lost_nodes
                       and time.monotonic() < deadline):
                    time.sleep(_REMOTE_POLL)
        except Exception:
            pass  # node 0's store is gone; there is nobody left to tell
        finally:
            if self.link is not None:
                self.link.close()  # says this node is done, not lost

    # -- signals ----------------------------------------------------------------
    def _stop_requested(self) -> None:
        """Raise LaunchInterrupted if a signal came while the nodes were meeting."""
        _raise_if_interrupted(self.signals, "while the nodes were meeting; no worker had started")



def _interface_towards(host: str, port: int) -> Optional[str]:
    """The interface of this host that reaches ``host`` (for GLOO_SOCKET_IFNAME)."""
    from .._network import interface_of, local_address_towards

    address = local_address_towards(host, port)
    return interface_of(address) if address else None
