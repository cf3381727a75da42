"""The worker side of the launcher's monitor: heartbeats, stack dumps, "I am stuck".

A launcher that runs a monitor (see :mod:`distrib.control.monitor`) passes
its endpoint in ``DISTRIB_MONITOR`` and a stack file in
``DISTRIB_STACK_FILE``. :func:`start` (called by the worker's bootstrap,
before the user's code) then:

- registers ``faulthandler`` on :data:`~distrib.control.stacks.DUMP_SIGNAL`,
  writing to the stack file, so the launcher can see this process's stacks
  even while a C call holds the GIL;
- starts a daemon thread that says hello, beats every
  ``DISTRIB_HEARTBEAT_INTERVAL`` seconds (1 s), and answers the launcher's
  requests for a stack snapshot.

:func:`report_stuck` is what a Coordinator calls when one of its waits times
out: it asks the launcher to snapshot every rank now, while the ranks are
still where they are stuck, and waits (a few seconds at most) until that is
done, so the timeout error that follows does not race the snapshot. Without
a monitor, both are no-ops.
"""
from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from typing import Mapping, Optional

from . import codec
from .stacks import DUMP_SIGNAL, MAIN_MARK, capture

__all__ = ["start", "stop", "report_stuck", "MONITOR_VAR", "STACK_FILE_VAR", "INTERVAL_VAR"]

MONITOR_VAR = "DISTRIB_MONITOR"
STACK_FILE_VAR = "DISTRIB_STACK_FILE"
INTERVAL_VAR = "DISTRIB_HEARTBEAT_INTERVAL"
MAX_MESSAGE = 1 << 20       # requests from the launcher are tiny
_STUCK_WAIT = 10.0          # seconds report_stuck waits for the launcher's snapshot

logger = logging.getLogger("distrib.control")

_agent: Optional["_Agent"] = None
_lock = threading.Lock()


def start(environ: Mapping[str, str] = os.environ) -> bool:
    """Start this process's agent if a launcher asked for one. Idempotent; True if running."""
    global _agent
    endpoint = environ.get(MONITOR_VAR)
    secret = environ.get("DISTRIB_SECRET")
    if not endpoint or not secret:
        return False
    with _lock:
        if _agent is not None and _agent.pid == os.getpid():
            return True
        try:
            rank = int(environ.get("RANK", "0"))
            interval = float(environ.get(INTERVAL_VAR, "1.0"))
        except ValueError:
            logger.warning("not starting the control agent: RANK or %s is not a number", INTERVAL_VAR)
            return False
        dumps = _register_faulthandler(environ.get(STACK_FILE_VAR))
        _agent = _Agent(endpoint, secret, rank, max(0.05, interval), dumps)
        atexit.register(stop)
        return True


def stop() -> None:
    """Stop the agent thread (at exit). Idempotent."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is not None and agent.pid == os.getpid():
        agent.stop()


def report_stuck(what: str) -> None:
    """Ask the launcher to snapshot every rank because ``what`` timed out here; wait for it."""
    agent = _agent
    if agent is None or agent.pid != os.getpid():
        return
    agent.report_stuck(what)


_stack_file = None  # kept open for faulthandler, which writes to its descriptor


def _register_faulthandler(path: Optional[str]) -> bool:
    """Dump every thread's stack to ``path`` on DUMP_SIGNAL; whether that is in place.

    Where it is not, the signal is ignored rather than left fatal, and the
    hello says so: the launcher then never sends it here.
    """
    global _stack_file
    if not path or DUMP_SIGNAL is None:
        return False
    try:
        _stack_file = open(path, "w")
        _stack_file.write(f"{MAIN_MARK}{threading.main_thread().ident:#x}\n")
        _stack_file.flush()
        # The default action of DUMP_SIGNAL ends the process. faulthandler puts back the
        # handler it found when it lets go (at interpreter exit too), and a monitor's
        # request can arrive just then, from a launcher that saw an exiting rank go
        # quiet: what it finds must be "ignore", so that such a request is harmless.
        signal.signal(DUMP_SIGNAL, signal.SIG_IGN)
        faulthandler.register(DUMP_SIGNAL, file=_stack_file, all_threads=True, chain=False)
        return True
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("stack dumps on signal are unavailable in this process: %s", exc)
        try:
            signal.signal(DUMP_SIGNAL, signal.SIG_IGN)
        except (OSError, ValueError):  # not the main thread
            pass
        return False


class _Agent:
    def __init__(self, endpoint: str, secret: str, rank: int, interval: float, dumps: bool = False):
        self.pid = os.getpid()
        self.rank = rank
        self.dumps = dumps  # DUMP_SIGNAL writes this process's stacks (else it is ignored)
        self.interval = interval
        self.host = socket.gethostname()
        self._endpoint = endpoint
        self._secret = secret
        self._stop = threading.Event()
        self.connected = threading.Event()  # the launcher answered our hello
        self._stuck: list[tuple[str, threading.Event]] = []
        self._stuck_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="distrib-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def report_stuck(self, what: str) -> None:
        if not self.connected.is_set():
            return  # no launcher is listening: nobody would take the snapshot
        done = threading.Event()
        with self._stuck_lock:
            self._stuck.append((what, done))
        done.wait(_STUCK_WAIT)

    # -- the thread: the only user of the socket -----------------------------------
    def _run(self) -> None:
        import zmq

        from ._security import client_socket

        context = zmq.Context()
        sock = client_socket(context, zmq.DEALER, self._secret, max_message=MAX_MESSAGE)
        waiting: dict[int, threading.Event] = {}  # stuck report id -> its waiter
        next_id = 0
        try:
            sock.connect(self._endpoint)
            self._send(sock, {"t": "hello", "rank": self.rank, "host": self.host, "pid": self.pid,
                              "dumps": self.dumps})
            next_beat = time.monotonic() + self.interval
            while not self._stop.is_set():
                with self._stuck_lock:
                    stuck, self._stuck = self._stuck, []
                for what, done in stuck:
                    next_id += 1
                    waiting[next_id] = done
                    self._send(sock, {"t": "stuck", "rank": self.rank, "what": what, "id": next_id})
                now = time.monotonic()
                if now >= next_beat:
                    self._send(sock, {"t": "beat", "rank": self.rank})
                    next_beat = now + self.interval
                if sock.poll(min(100, max(1, int((next_beat - now) * 1000)))):
                    self._handle(sock, sock.recv(), waiting)
        except Exception as exc:  # never take the worker down; say why monitoring stopped
            if not self._stop.is_set():
                logger.warning("rank %d: the control agent stopped: %s", self.rank, exc)
        finally:
            for done in waiting.values():
                done.set()
            sock.close(0)
            context.term()

    def _handle(self, sock, data: bytes, waiting: dict) -> None:
        try:
            message = codec.decode(data, MAX_MESSAGE)
            kind = message["t"]
        except (codec.MessageError, TypeError, KeyError) as exc:
            logger.warning("rank %d: dropped a malformed control message: %s", self.rank, exc)
            return
        if kind == "welcome":
            self.connected.set()
        elif kind == "dump":
            snap = capture(self.rank, self.host, skip=[threading.get_ident()])
            self._send(sock, {"t": "stacks", "id": message.get("id", 0), **snap.to_message()})
        elif kind == "dumped":
            done = waiting.pop(message.get("id"), None)
            if done is not None:
                done.set()
        else:
            logger.warning("rank %d: dropped a control message of unknown type %r", self.rank, kind)

    @staticmethod
    def _send(sock, message: dict) -> None:
        import zmq

        try:  # never block: with the launcher gone, beats are simply not delivered
            sock.send(codec.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass
