"""What a launcher does with the control monitor: heartbeats and "where is each rank?".

:class:`HangWatch` wraps one node's :class:`~distrib.control.monitor.Monitor`
for a launcher's supervision loop. On each :meth:`HangWatch.check` it:

- reports, with a stack snapshot of every running rank, when a rank's
  Coordinator timed out (the rank asked for it before raising);
- reports a running rank that stopped sending heartbeats (it may hold the
  GIL in a C call), with that rank's stacks taken through faulthandler;
- reports every rank's whereabouts when the user sends SIGUSR1 to the
  launcher, and keeps running.

The launcher also calls :meth:`HangWatch.report` itself before it stops a
launch that ran out of time. In a multi-node launch, a report for a timeout or
SIGUSR1 asks the other nodes' launchers for their ranks' snapshots (through
the rendezvous store) and covers every rank of the launch. A report is one screen (see
:func:`distrib.control.stacks.summarize`); with a log directory, every
thread of every rank also goes to a ``stacks-*.txt`` file there.

Monitoring is best effort: if its socket cannot be made, the launch runs
without it and says so once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from .._text import format_ranks, node_list, rank_list

__all__ = ["HangWatch", "DUMP_REQUEST_SIGNAL"]

logger = logging.getLogger("distrib.launcher")

DUMP_REQUEST_SIGNAL = signal.SIGUSR1  # what a user sends the launcher to see where ranks are
HEARTBEAT_TIMEOUT = 5.0               # seconds without a heartbeat before a rank is reported
_STUCK_QUIET = 10.0  # seconds after a timeout's report in which further timeouts are not reported again
_NODE_WAIT = 6.0     # seconds a report waits for the other nodes' snapshots


class HangWatch:
    def __init__(self, secret: str, write: Callable[[str], None], scratch: str,
                 log_dir: Optional[str] = None, heartbeat_timeout: Optional[float] = None,
                 nodes=None):
        self._write = write
        self._nodes = nodes  # multi-node: the NodeRendezvous, through which nodes swap snapshots
        self._scratch = scratch
        self._log_dir = log_dir
        self._dump_requested = False
        self._last_stuck_report = -float("inf")
        self._previous_handler: Any = None  # SIGUSR1's handler before ours
        self.monitor = None
        timeout = heartbeat_timeout if heartbeat_timeout is not None else float(
            os.environ.get("DISTRIB_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT))
        try:
            from ..control.monitor import Monitor

            self.monitor = Monitor(secret, heartbeat_timeout=timeout)
        except Exception as exc:  # e.g. no loopback interface, no pyzmq
            logger.warning("running without heartbeats and stack dumps: %s", exc)
        self.reports: list[str] = []  # what was reported, in order (for the launcher's errors)

    # -- workers ---------------------------------------------------------------------
    def worker_env(self, rank: int) -> dict[str, str]:
        if self.monitor is None:
            return {}
        return self.monitor.worker_env(self._stack_file(rank))

    def watch(self, rank: int, pid: int) -> None:
        if self.monitor is not None:
            self.monitor.watch(rank, pid, self._stack_file(rank))

    def host_of(self, rank: int) -> str:
        return self.monitor.host_of(rank) if self.monitor is not None else ""

    def _stack_file(self, rank: int) -> str:
        return os.path.join(self._scratch, f"rank{rank}.stacks")

    # -- the supervision loop's hook -------------------------------------------------
    def check(self, running: set[int], wait: float) -> None:
        """Handle the monitor's traffic for up to ``wait`` seconds, and report what needs it."""
        if self.monitor is None:
            time.sleep(wait)
            return
        self.monitor.poll(wait)
        stuck = self.monitor.stuck()
        if stuck and time.monotonic() - self._last_stuck_report < _STUCK_QUIET:
            self.monitor.release_stuck()  # the same hang, seen by another rank a moment later
        elif stuck:
            first_rank, what = stuck[0]
            others = sorted({r for r, _ in stuck} - {first_rank})
            also = f" (and on {rank_list(others)})" if others else ""
            reason = f"{what} timed out on rank {first_rank}{also}"
            self.report(f"{reason}. Where each rank is:", running, ask_nodes=reason)
            self.monitor.release_stuck()
            self._last_stuck_report = time.monotonic()
        for rank, host, seconds in self.monitor.silent(running):
            on = f" on {host}" if host else ""
            self.report(f"rank {rank}{on} has sent no heartbeat for {seconds:.1f}s: it may be stuck in "
                        "a call that holds the GIL. Its stacks:", {rank})
        if self._dump_requested:
            self._dump_requested = False
            reason = "stack dump requested (SIGUSR1)"
            self.report(f"{reason}. Where each rank is:", running, ask_nodes=reason)

    def asked_by(self, number: int, node: int, reason: str, running: set[int]) -> None:
        """Node ``node`` asked for this node's snapshots (request ``number``, ``reason`` why)."""
        snapshots = self.monitor.snapshot(sorted(running), timeout=1.5) if self.monitor and running else {}
        if self._answer(number, node, snapshots):
            self._write(f"node {node} asked where every rank is ({reason}); sent this node's ranks "
                        f"({format_ranks(running) or 'none running'}) for its report")
        if not reason.startswith("stack dump"):
            self._last_stuck_report = time.monotonic()  # this node's own timeouts: the same hang

    def _answer(self, number: int, node: int, snapshots: dict) -> bool:
        from ..control import codec

        payload = codec.encode({str(rank): (snap.to_message() if snap is not None else None)
                                for rank, snap in snapshots.items()})
        try:
            self._nodes.post_stacks(number, payload)
            return True
        except Exception as exc:  # the store is gone; the launch is ending anyway
            logger.warning("could not send this node's stacks to node %d: %s", node, exc)
            return False

    def _other_nodes(self, reason: str, local: dict) -> tuple[dict, list[int], list[int]]:
        """Ask the other nodes for their snapshots.

        Returns their snapshots, the nodes that did not answer, and the nodes
        that asked us at the same time (each gets our snapshots at once: two
        nodes that see one hang together must not wait for each other).
        """
        from ..control import codec
        from ..control.stacks import Snapshot

        nodes = self._nodes
        others = [k for k in range(nodes.nnodes) if k != nodes.node_rank]
        answers: dict[int, bytes] = {}
        askers: list[int] = []
        try:
            number = nodes.request_reports(reason)
            deadline = time.monotonic() + _NODE_WAIT
            while True:
                for asked, node, _ in nodes.report_requests():
                    self._answer(asked, node, local)
                    askers.append(node)
                answers.update(nodes.stacks_for(number))
                waiting = set(others) - set(answers) - set(nodes.finished_nodes())
                if not waiting or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except Exception as exc:  # the store is gone; the launch is ending anyway
            logger.warning("could not ask the other nodes for their stacks: %s", exc)
            return {}, [], askers
        found: dict = {}
        for data in answers.values():
            try:
                for rank, message in codec.decode(data).items():
                    found[int(rank)] = Snapshot.from_message(message) if message is not None else None
            except (codec.MessageError, ValueError, AttributeError, TypeError) as exc:
                logger.warning("dropped a malformed stack report from another node: %s", exc)
        silent = sorted(waiting)
        return {r: snap for r, snap in found.items() if r not in local}, silent, askers

    def report(self, title: str, ranks, write: bool = True, ask_nodes: Optional[str] = None) -> str:
        """Snapshot ``ranks``, write the one-screen summary (if ``write``), and return it.

        With ``ask_nodes`` (the reason) in a multi-node launch, the other nodes'
        ranks are asked for too and the summary covers the whole launch.
        """
        if self.monitor is None or (not ranks and not (ask_nodes and self._nodes)):
            return ""
        from ..control.stacks import full_text, summarize

        snapshots = self.monitor.snapshot(sorted(ranks), timeout=1.5) if ranks else {}
        silent_nodes: list[int] = []
        if ask_nodes and self._nodes is not None:
            remote, silent_nodes, askers = self._other_nodes(ask_nodes, snapshots)
            snapshots = {**snapshots, **remote}
            lower = [k for k in askers if k < self._nodes.node_rank]
            if lower and not ask_nodes.startswith("stack dump"):
                # Another node saw the same hang at the same moment and reports every rank.
                note = (f"{ask_nodes}; node {min(lower)} reports where every rank of the launch is "
                        "(this node sent its ranks)")
                self._write(note)
                return note
        text = summarize(snapshots, title)
        if silent_nodes:
            text += f"\n({node_list(silent_nodes)} did not answer within {_NODE_WAIT:g}s)"
        if self._log_dir:
            path = os.path.join(self._log_dir, time.strftime("stacks-%Y%m%d-%H%M%S.txt"))
            try:
                with open(path, "a") as f:
                    f.write(f"# {title}\n{full_text(snapshots)}")
                text += f"\nevery thread of every rank: {path}"
            except OSError as exc:
                text += f"\n(could not write {path}: {exc})"
        self.reports.append(text)
        if write:
            self._write(text)
        return text

    # -- SIGUSR1 ---------------------------------------------------------------------
    def install_signal(self) -> None:
        """Report on SIGUSR1 (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return
        def requested(signum, frame):
            self._dump_requested = True
        self._previous_handler = signal.signal(DUMP_REQUEST_SIGNAL, requested)

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(DUMP_REQUEST_SIGNAL, self._previous_handler)
            self._previous_handler = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
