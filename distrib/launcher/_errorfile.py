"""The error-record protocol between a command launcher and its workers.

A worker that fails with an uncaught exception (or a non-zero ``sys.exit``)
writes one JSON record: ``exc_type``, ``message``, ``traceback``,
``exitcode``, ``timestamp`` (wall clock of the failure), ``host``, ``pid``.
The launcher reads it to name the root cause (the earliest timestamp) and to
show its traceback. It is the torchelastic error-file idea, without the
decorator: the bootstrap writes the record for every program.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Mapping, Optional

__all__ = ["LAUNCHER_PID_VAR", "ERROR_FILE_VAR", "ERROR_DIR_VAR", "TORCH_ERROR_FILE_VAR", "error_file_for",
           "read_error_file", "write_error_file", "torch_error_file", "read_torch_error_file"]

# The worker dies with this launcher process (see _process.die_with_parent).
LAUNCHER_PID_VAR = "DISTRIB_LAUNCHER_PID"
# Where this worker writes its record.
ERROR_FILE_VAR = "DISTRIB_ERROR_FILE"
# A folder instead of a file: the worker writes rank<RANK>.json there (for
# launchers that cannot name each worker's file, such as srun).
ERROR_DIR_VAR = "DISTRIB_ERROR_DIR"
# torchelastic's own error file (written by torch.distributed.elastic's @record): a program
# written for torchrun that records its error there is reported from it.
TORCH_ERROR_FILE_VAR = "TORCHELASTIC_ERROR_FILE"


def torch_error_file(error_file: str) -> str:
    """Where a worker whose record goes to ``error_file`` is told to put torch's (beside it)."""
    return error_file[:-len(".json")] + ".torchelastic.json" if error_file.endswith(".json") \
        else error_file + ".torchelastic"


def error_file_for(environ: Mapping[str, str]) -> Optional[str]:
    """The record's path for the worker whose environment is ``environ`` (``None``: none asked for)."""
    path = environ.get(ERROR_FILE_VAR)
    if path:
        return path
    folder = environ.get(ERROR_DIR_VAR)
    if folder and environ.get("RANK"):
        return os.path.join(folder, f"rank{environ['RANK']}.json")
    return None


def write_error_file(path: str, **record) -> None:
    """Write ``record`` (plus timestamp, host and pid) atomically: a reader never sees half of it."""
    record.update(timestamp=time.time(), host=socket.gethostname(), pid=os.getpid())
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"distrib: could not write the error record {path}: {exc}", file=sys.stderr)


def read_error_file(path: str) -> Optional[dict]:
    """The record a worker left at ``path``, or ``None`` if there is none (or it is unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_torch_error_file(path: str) -> Optional[dict]:
    """torchelastic's record at ``path`` (``{"message": {"message": "Type: text", "extraInfo":
    {"py_callstack": ..., "timestamp": ...}}}``) in our record's fields, or None."""
    record = read_error_file(path)
    if record is None:
        return None
    message = record.get("message")
    extra: dict
    if isinstance(message, str):
        text, extra = message, {}
    elif isinstance(message, dict):
        text, extra = str(message.get("message", "")), message.get("extraInfo") or {}
    else:
        return None
    exc_type, sep, rest = text.partition(": ")
    if not sep or " " in exc_type:
        exc_type, rest = "Exception", text
    try:
        timestamp = float(extra.get("timestamp", time.time()))
    except (TypeError, ValueError):
        timestamp = time.time()
    return {"exc_type": exc_type, "message": rest, "traceback": str(extra.get("py_callstack", "")),
            "timestamp": timestamp}
