"""Worker output to the console and to per-rank log files, whole lines only.

One relay thread reads every worker's stdout and stderr pipes, cuts the bytes
into lines, and writes each complete line with its rank's prefix (``[3] ...``)
in a single write. A line is never split, so two ranks' output never mix
within one line. A line without its newline is held until the newline comes
(or the stream ends, or it grows past ``MAX_LINE`` bytes).
"""
from __future__ import annotations

import collections
import os
import selectors
import threading
from typing import BinaryIO, Callable, Deque, Optional

__all__ = ["OutputRelay", "MAX_LINE", "log_file_path", "write_note"]

MAX_LINE = 64 * 1024  # a longer partial line is written in pieces rather than held
TAIL_LINES = 20  # the last stderr lines kept per rank, for the failure report
_READ_SIZE = 65536


def log_file_path(log_dir: str, rank: int) -> str:
    """Where ``--log-dir`` keeps rank ``rank``'s output (stdout and stderr, unprefixed)."""
    return os.path.join(log_dir, f"rank{rank}.log")


def write_note(stream: BinaryIO, text: str, prefix: str = "distrib-run: ") -> None:
    """``text``'s lines, each with ``prefix``, in one write (a stream that went away is ignored)."""
    data = "".join(f"{prefix}{line}\n" for line in text.splitlines()).encode(errors="replace")
    try:
        stream.write(data)
        stream.flush()
    except (OSError, ValueError):
        pass


class _Stream:
    def __init__(self, rank: int, fd: int, console: Optional[BinaryIO], log: Optional[BinaryIO],
                 tail: Optional[Deque[bytes]] = None):
        self.rank = rank
        self.fd = fd
        self.console = console  # None: this rank is not shown
        self.log = log
        self.tail = tail  # stderr: its last lines, shown or not
        self.partial = b""
        self.tail_partial = b""
        self.prefix = f"[{rank}] ".encode()


class OutputRelay:
    """Relays worker pipes to ``stdout``/``stderr`` with rank prefixes, and to log files.

    ``show(rank)`` chooses the ranks on the console, ``streams(rank)`` which of a
    shown rank's streams (bits: 1 stdout, 2 stderr). ``add(rank, stdout_fd, stderr_fd)`` hands over the read ends of one
    worker's pipes (the relay closes them). ``close(timeout)`` waits for
    every pipe to reach end-of-file, then flushes and closes the log files.
    """

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, log_dir: Optional[str] = None,
                 show: Optional[Callable[[int], bool]] = None, prefix: bool = True,
                 streams: Optional[Callable[[int], int]] = None):
        self._out, self._err = stdout, stderr
        self._log_dir = log_dir
        self._show = show or (lambda rank: True)
        self._streams = streams or (lambda rank: 3)  # bits of a shown rank's streams on the console
        self._prefix = prefix
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # one writer at a time per console stream
        self._logs: dict[int, BinaryIO] = {}
        self._tails: dict[int, Deque[bytes]] = {}
        self._open = 0
        self._changed = threading.Condition()
        # A self-pipe wakes the thread when a stream is added.
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="distrib-output", daemon=True)
        self._thread.start()

    def add(self, rank: int, stdout_fd: int, stderr_fd: int) -> None:
        log = None
        if self._log_dir is not None:
            log = self._logs.get(rank)
            if log is None:
                log = self._logs[rank] = open(log_file_path(self._log_dir, rank), "ab", buffering=0)
        streams = self._streams(rank) if self._show(rank) else 0
        tail = self._tails.setdefault(rank, collections.deque(maxlen=TAIL_LINES))
        with self._changed:
            for fd, console, bit in ((stdout_fd, self._out, 1), (stderr_fd, self._err, 2)):
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ,
                                        _Stream(rank, fd, console if streams & bit else None, log,
                                                tail if bit == 2 else None))
                self._open += 1
        os.write(self._wake_w, b"x")

    def note(self, text: str, prefix: str = "distrib-run: ") -> None:
        """The launcher's own lines, on stderr, never inside a worker's line."""
        with self._lock:
            write_note(self._err, text, prefix)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout`` seconds) for the pipes to end, then stop and close."""
        with self._changed:
            self._changed.wait_for(lambda: self._open == 0, timeout=timeout)
            self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2.0)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._finish(key.data)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    # -- relay thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._changed:
                if self._stopping:
                    return
            for key, _ in self._selector.select():
                stream = key.data
                if stream is None:
                    os.read(self._wake_r, 4096)
                    continue
                try:
                    data = os.read(stream.fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    self._feed(stream, data)
                else:
                    self._finish(stream)

    def tail(self, rank: int) -> list[str]:
        """The last lines rank ``rank`` wrote to stderr (whole lines only)."""
        with self._lock:
            return [line.decode(errors="replace") for line in self._tails.get(rank, ())]

    def _feed(self, stream: _Stream, data: bytes) -> None:
        if stream.log is not None:
            stream.log.write(data)
        if stream.tail is not None:
            *lines, stream.tail_partial = (stream.tail_partial + data).split(b"\n")
            stream.tail_partial = stream.tail_partial[-MAX_LINE:]
            with self._lock:
                stream.tail.extend(line[:1024] for line in lines)
        if stream.console is None:
            return
        buffered = stream.partial + data
        cut = buffered.rfind(b"\n") + 1
        if cut == 0 and len(buffered) > MAX_LINE:
            cut = len(buffered)
        complete, stream.partial = buffered[:cut], buffered[cut:]
        if complete:
            self._emit(stream, complete)

    def _finish(self, stream: _Stream) -> None:
        """End of one pipe: write what is left of its last line, and forget it."""
        if stream.console is not None and stream.partial:
            self._emit(stream, stream.partial + b"\n")
            stream.partial = b""
        try:
            self._selector.unregister(stream.fd)
        except (KeyError, ValueError):
            pass
        os.close(stream.fd)
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def _emit(self, stream: _Stream, complete: bytes) -> None:
        """Write whole lines (``complete`` ends with a newline, or is an over-long piece)."""
        lines = complete[:-1].split(b"\n") if complete.endswith(b"\n") else complete.split(b"\n")
        prefix = stream.prefix if self._prefix else b""
        text = b"".join(prefix + line + b"\n" for line in lines)
        console = stream.console
        if console is None:
            return
        with self._lock:
            try:
                console.write(text)
                console.flush()
            except (OSError, ValueError):
                stream.console = None  # the console went away (a closed pipe); keep the logs
