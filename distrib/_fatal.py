"""Ending a process from a background thread that found it can no longer compute correctly.

This is what NCCL's asynchronous error handling does for a collective that
failed where no Python call could raise (a CUDA-graph replay, say): report,
then end the process, rather than let it go on with wrong numbers. Here the
report has three parts: the message on stderr; the launcher's hang report
(every rank's stack), asked for through the control agent; and the failure
record the launcher reads to name the root cause, written by the hooks that
the launchers install in their workers (:func:`add_hook`).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable, NoReturn, Optional

__all__ = ["EXIT_CODE", "add_hook", "stop_process"]

EXIT_CODE = 1
Hook = Callable[[str, str], None]  # (exception type name, message)

_hooks: list[Hook] = []
_stopping = threading.Lock()


def add_hook(hook: Hook) -> None:
    """Have :func:`stop_process` call ``hook(exc_type, message)`` before the process ends."""
    _hooks.append(hook)


def stop_process(exc_type: str, message: str, report: Optional[str] = None) -> NoReturn:
    """Report ``message`` and end the process with :data:`EXIT_CODE` (from any thread).

    ``report``: what failed, for the launcher's hang report (e.g. "custom
    all-reduce"); the call waits briefly for the launcher to snapshot every
    rank. A second caller (another thread) waits for the first to finish.
    """
    _stopping.acquire()  # never released: the process ends below
    try:
        rank = os.environ.get("RANK")
        print(f"distrib{f' rank {rank}' if rank else ''}: {message}", file=sys.stderr, flush=True)
        if report:
            from .control import agent

            agent.report_stuck(report)
        for hook in list(_hooks):
            try:
                hook(exc_type, message)
            except Exception:  # noqa: BLE001 — the process ends whatever a hook does
                pass
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)
