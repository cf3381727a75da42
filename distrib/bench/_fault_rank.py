"""The rank side of ``python -m distrib.bench faults``: a program that faults on purpose.

One module serves both launchers: ``distrib.launch`` runs :func:`target`, and
``distrib-run`` runs this file as a script. Read from the environment:

- ``DISTRIB_FAULT_DIR``: where each rank writes ``pid.<rank>`` (at import, so that a
  rank faulting at import is counted too) and the faulting rank ``fault.<rank>``, the
  wall-clock time just before its fault;
- ``DISTRIB_FAULT_KIND``: raise, exit (``sys.exit(3)``), os_exit (``os._exit(7)``),
  sigkill, sigsegv, or none;
- ``DISTRIB_FAULT_STAGE``: import, start, barrier, all_gather, all_reduce,
  after_return (an ``atexit`` hook, after the result went back), or hold (no rank
  faults: the ranks wait in a barrier that rank 0 never reaches, for faults of the
  launcher itself), or start_hold (no rank faults; the ranks just wait).

Rank 0 faults; the other ranks do what a healthy rank would and then wait (up to a
minute, the figure a teardown that missed them would show).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import time

FAULT_RANK = 0
_LINGER = 60.0  # seconds the healthy ranks wait at the end, unless stopped


def _setting(name: str) -> str:
    return os.environ.get(f"DISTRIB_FAULT_{name}", "")


def _rank() -> int:
    # A launcher sets RANK; a bare srun task has only SLURM's variable until distrib.init().
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "-1")


def _write(name: str, text: str) -> None:
    folder = _setting("DIR")
    if folder:
        with open(os.path.join(folder, f"{name}.{_rank()}"), "w") as f:
            f.write(text)


def fault() -> None:
    """Fault now, the way DISTRIB_FAULT_KIND says."""
    kind = _setting("KIND")
    _write("fault", repr(time.time()))
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {_rank()}")
    if kind == "exit":
        sys.exit(3)
    if kind == "os_exit":
        os._exit(7)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigsegv":
        import faulthandler

        faulthandler.disable()  # die of the signal, as a crash in C code would
        ctypes.string_at(0)
    raise ValueError(f"DISTRIB_FAULT_KIND={kind!r} is not a fault kind")


def _faults_here(stage: str) -> bool:
    return _rank() == FAULT_RANK and _setting("STAGE") == stage


def target() -> int:
    """A rank's work; faults on rank 0 at the configured stage."""
    stage = _setting("STAGE")
    if _faults_here("start"):
        fault()
    if stage in ("barrier", "all_gather", "all_reduce", "hold"):
        import distrib

        ctx = distrib.init(timeout=60)
        coord = ctx.coordinator
        if _faults_here(stage) and stage != "hold":  # hold: the launcher is what faults
            time.sleep(0.3)  # the others are inside the call by now
            fault()
        if stage == "hold" and _rank() == FAULT_RANK:
            time.sleep(_LINGER)  # never reaches the barrier: the others wait in it
        if stage in ("barrier", "hold"):
            if stage == "hold":
                _write("ready", "")  # for the bench: this rank is about to wait in the barrier
            coord.barrier()
        elif stage == "all_gather":
            coord.all_gather(b"x")
        else:
            import torch

            from distrib import communicator

            communicator.create(order=["gloo"]).all_reduce(torch.ones(4))
    if _faults_here("after_return"):
        atexit.register(fault)
        return _rank()
    time.sleep(_LINGER)
    return _rank()


# At import: who we are, and the import-time fault.
if _rank() >= 0 and _setting("DIR"):
    _write("pid", str(os.getpid()))
    if _faults_here("import"):
        fault()

if __name__ == "__main__":  # under distrib-run
    target()
