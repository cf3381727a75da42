"""Where is each rank? Stack snapshots of worker processes, and the one-screen summary.

A snapshot comes from one of two places:

- the rank's control agent answers a request with every thread's frames
  (file, line, function, source text), taken with ``sys._current_frames``;
- when the rank cannot answer (a C call holding the GIL), the launcher sends
  it :data:`DUMP_SIGNAL`, and ``faulthandler``, which needs no GIL, writes the
  stacks to the rank's stack file; :func:`parse_faulthandler` reads them back.

:func:`summarize` groups ranks by where their main thread is: the innermost
frame of the user's own code, and the library function it called. Ranks in
the same place share one line, so eight ranks fit on one screen::

    ranks 0-2,4-7  barrier     train.py:42 in step   coord.barrier()
    rank 3         all_gather  train.py:40 in step   coord.all_gather(b"x")
"""
from __future__ import annotations

import linecache
import os
import re
import signal
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Iterable, Mapping, Optional

from .._text import format_ranks

__all__ = ["DUMP_SIGNAL", "Frame", "ThreadStack", "Snapshot", "capture", "parse_faulthandler",
           "summarize"]

# A real-time signal: its default action would end the process, so it is sent
# only to workers whose agent has said hello (and so has registered it). Users
# take SIGUSR1/SIGUSR2 for themselves (SLURM's --signal, checkpointing).
DUMP_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else None


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str
    text: str = ""   # the source line, when known

    def site(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line} in {self.function}"


@dataclass(frozen=True)
class ThreadStack:
    name: str
    ident: int
    main: bool
    frames: tuple[Frame, ...]  # outermost first


@dataclass(frozen=True)
class Snapshot:
    """One rank's threads at one moment; ``source`` is "agent" or "faulthandler"."""

    rank: int
    host: str
    pid: int
    threads: tuple[ThreadStack, ...]
    source: str = "agent"

    def main_thread(self) -> Optional[ThreadStack]:
        for t in self.threads:
            if t.main:
                return t
        return self.threads[0] if self.threads else None

    def to_message(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "source": self.source,
                "threads": [{"name": t.name, "ident": t.ident, "main": t.main,
                             "frames": [[f.file, f.line, f.function, f.text] for f in t.frames]}
                            for t in self.threads]}

    @classmethod
    def from_message(cls, message: Mapping) -> "Snapshot":
        """Rebuild a snapshot sent by an agent; raises ValueError if it is malformed."""
        try:
            threads = tuple(
                ThreadStack(name=str(t["name"]), ident=int(t["ident"]), main=bool(t["main"]),
                            frames=tuple(Frame(str(f[0]), int(f[1]), str(f[2]), str(f[3]))
                                         for f in t["frames"]))
                for t in message["threads"])
            return cls(rank=int(message["rank"]), host=str(message["host"]), pid=int(message["pid"]),
                       threads=threads, source=str(message.get("source", "agent")))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed stack snapshot: {exc}") from exc


# -- taking and reading snapshots ---------------------------------------------------

def capture(rank: int, host: str, skip: Iterable[int] = ()) -> Snapshot:
    """Every thread of this process but those in ``skip`` (thread idents)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    skipped = set(skip)
    threads: list[ThreadStack] = []
    for ident, top in sys._current_frames().items():
        if ident in skipped:
            continue
        frames: list[Frame] = []
        frame: Optional[FrameType] = top
        while frame is not None:
            code = frame.f_code
            text = linecache.getline(code.co_filename, frame.f_lineno).strip()
            frames.append(Frame(code.co_filename, frame.f_lineno,
                                getattr(code, "co_qualname", code.co_name), text))
            frame = frame.f_back
        threads.append(ThreadStack(names.get(ident, f"thread {ident:#x}"), ident, ident == main,
                                   tuple(reversed(frames))))
    threads.sort(key=lambda t: (not t.main, t.name))
    return Snapshot(rank=rank, host=host, pid=os.getpid(), threads=tuple(threads))


_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
MAIN_MARK = "distrib main thread "  # the agent writes this line, with the ident, at the top of the file


def parse_faulthandler(text: str, rank: int, host: str, pid: int) -> Optional[Snapshot]:
    """A snapshot from ``faulthandler`` output (the last dump in ``text``), or None."""
    main = None
    for line in text.splitlines():
        if line.startswith(MAIN_MARK):
            try:
                main = int(line[len(MAIN_MARK):].strip(), 16)
            except ValueError:
                pass
    threads: list[ThreadStack] = []
    ident: Optional[int] = None
    frames: list[Frame] = []

    def flush() -> None:
        if ident is not None:
            threads.append(ThreadStack(f"thread {ident:#x}", ident, ident == main,
                                       tuple(reversed(frames))))

    for line in text.splitlines():
        head = _THREAD.match(line)
        if head:
            flush()
            ident, frames = int(head.group(1), 16), []
            continue
        frame = _FRAME.match(line)
        if frame and ident is not None:
            path, lineno = frame.group(1), int(frame.group(2))
            frames.append(Frame(path, lineno, frame.group(3),
                                linecache.getline(path, lineno).strip()))
    flush()
    if not threads:
        return None
    if not any(t.main for t in threads):
        threads[0] = ThreadStack(threads[0].name, threads[0].ident, True, threads[0].frames)
    return Snapshot(rank=rank, host=host, pid=pid, threads=tuple(threads), source="faulthandler")


# -- the summary ----------------------------------------------------------------------

def _library_roots() -> tuple[str, ...]:
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # distrib itself
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.abspath(path))
    return tuple(sorted(roots))


_LIBRARY_ROOTS = _library_roots()


def is_library(path: str) -> bool:
    """True for frames of distrib, the standard library and installed packages."""
    if path.startswith("<"):  # <frozen ...>, <string>
        return True
    full = os.path.abspath(path)
    return any(full == root or full.startswith(root + os.sep) for root in _LIBRARY_ROOTS) or \
        "site-packages" in full or "dist-packages" in full


@dataclass(frozen=True)
class Place:
    """Where a main thread is: the library call (if any) made from the innermost user frame."""

    call: str                 # "barrier", "all_gather", "sleep" … or "" when in user code
    site: Optional[Frame]     # the innermost frame of the user's code

    def key(self) -> tuple:
        return (self.call, self.site.file if self.site else "", self.site.line if self.site else 0)


def place_of(thread: ThreadStack) -> Place:
    frames = thread.frames
    user = [i for i, f in enumerate(frames) if not is_library(f.file)]
    if not user:
        return Place(call=_short(frames[-1].function) if frames else "", site=None)
    last = user[-1]
    call = _short(frames[last + 1].function) if last + 1 < len(frames) else ""
    return Place(call=call, site=frames[last])


def _short(function: str) -> str:
    """``GlooCoordinator.barrier`` -> ``barrier``: the name a user wrote."""
    return function.rsplit(".", 1)[-1]


@dataclass
class _Group:
    place: Place
    example: Snapshot          # the first rank found here, shown for the whole group
    main: ThreadStack          # that rank's main thread
    ranks: list = field(default_factory=list)


def summarize(snapshots: Mapping[int, Optional[Snapshot]], title: str, *, max_frames: int = 12) -> str:
    """One screen: ranks grouped by where their main thread is, then one stack per group.

    ``snapshots`` maps every rank asked to its snapshot, or None if it did not answer.
    """
    groups: dict[tuple, _Group] = {}
    silent = []
    for rank in sorted(snapshots):
        snap = snapshots[rank]
        main = snap.main_thread() if snap is not None else None
        if snap is None or main is None:
            silent.append(rank)
            continue
        place = place_of(main)
        group = groups.setdefault(place.key(), _Group(place, example=snap, main=main))
        group.ranks.append(rank)
    lines = [title]
    rows = []
    for group in sorted(groups.values(), key=lambda g: g.ranks[0]):
        who = f"rank{'s' if len(group.ranks) > 1 else ''} {format_ranks(group.ranks)}"
        call = f"in {group.place.call}" if group.place.call else "in its own code"
        site = group.place.site
        where = f"{site.site()}" + (f"   {site.text}" if site and site.text else "") if site else ""
        rows.append((who, call, where))
    if silent:
        rows.append((f"rank{'s' if len(silent) > 1 else ''} {format_ranks(silent)}",
                     "did not answer", "(exited, or its process cannot be reached)"))
    width_who = max((len(r[0]) for r in rows), default=0)
    width_call = max((len(r[1]) for r in rows), default=0)
    lines += [f"  {w:<{width_who}}  {c:<{width_call}}  {s}".rstrip() for w, c, s in rows]
    for group in sorted(groups.values(), key=lambda g: g.ranks[0]):
        snap, main = group.example, group.main
        host = f" on {snap.host}" if snap.host else ""
        via = " (from faulthandler: it held the GIL)" if snap.source == "faulthandler" else ""
        lines.append(f"--- main thread of rank {snap.rank}{host}, pid {snap.pid}{via}"
                     f"{'; same place: ranks ' + format_ranks(group.ranks) if len(group.ranks) > 1 else ''} ---")
        shown, hidden = _trim(main.frames, max_frames)
        if hidden:
            lines.append(f"  ... {hidden} outer frames")
        for f in shown:
            lines.append(f'  File "{f.file}", line {f.line}, in {f.function}')
            if f.text:
                lines.append(f"    {f.text}")
    return "\n".join(lines)


_AGENT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")


def _trim(frames: tuple[Frame, ...], max_frames: int) -> tuple[tuple[Frame, ...], int]:
    """The frames worth showing, and how many outer ones were left out.

    Outer frames before the user's first (runpy, the bootstrap) and the
    innermost frames of the timeout report itself are left out.
    """
    for i, f in enumerate(frames):
        if f.function.endswith("_report_stuck") or os.path.abspath(f.file) == _AGENT_FILE:
            frames = frames[:i]
            break
    first_user = next((i for i, f in enumerate(frames) if not is_library(f.file)), 0)
    start = max(first_user, len(frames) - max_frames)
    return frames[start:], start


def full_text(snapshots: Mapping[int, Optional[Snapshot]]) -> str:
    """Every thread of every rank, for a log file."""
    out = []
    for rank in sorted(snapshots):
        snap = snapshots[rank]
        if snap is None:
            out.append(f"=== rank {rank}: no answer ===")
            continue
        out.append(f"=== rank {rank} on {snap.host}, pid {snap.pid} ({snap.source}) ===")
        for t in snap.threads:
            out.append(f"--- thread {t.name!r}{' (main)' if t.main else ''} ---")
            for f in t.frames:
                out.append(f'  File "{f.file}", line {f.line}, in {f.function}')
                if f.text:
                    out.append(f"    {f.text}")
    return "\n".join(out) + "\n"
