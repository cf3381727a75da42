"""The first code a command launcher's worker runs: ``python -m distrib.launcher._bootstrap``.

Usage: ``python -m distrib.launcher._bootstrap (SCRIPT | -m MODULE) [ARGS ...]``.
It runs the user's program as ``python SCRIPT ARGS`` would (same ``sys.argv``,
``__name__ == "__main__"``, the script's folder first on ``sys.path``, an
uncaught exception printed by ``sys.excepthook`` and exit status 1), with
four additions, driven by environment variables the launcher sets (see
:mod:`distrib.launcher._errorfile`):

- the worker dies with its launcher, even when the launcher is SIGKILLed
  (:func:`~distrib.launcher._process.die_with_parent`);
- an uncaught exception (or a non-zero ``sys.exit``) is recorded in an error
  file, so the launcher can name the root cause and show its traceback
  without the user adding a decorator;
- the launcher's control agent starts (:mod:`distrib.control.agent`):
  heartbeats, and stack snapshots when the launcher asks where ranks are;
- with no LaunchInfo variables but a scheduler's (SLURM under ``srun``), the
  detected LaunchInfo is exported first, so a script written for torchrun
  (``init_process_group(init_method="env://")``) runs unchanged.

Nothing in distrib imports this module: it runs only as ``__main__``.
"""
from __future__ import annotations

import os
import runpy
import sys
import traceback
from typing import Optional

from ._errorfile import LAUNCHER_PID_VAR, error_file_for, write_error_file
from ._process import freeze_for_exit

_USAGE = "usage: python -m distrib.launcher._bootstrap (SCRIPT | -m MODULE) [ARGS ...]"


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        print(_USAGE, file=sys.stderr)
        sys.exit(2)
    launcher_pid = os.environ.get(LAUNCHER_PID_VAR)
    if launcher_pid:
        from ._process import die_with_parent

        die_with_parent(int(launcher_pid))
    _export_detected_launch_info()
    from ..control import agent

    agent.start()  # heartbeats and stack dumps for the launcher, if it asked
    error_file = error_file_for(os.environ)
    if error_file:
        from .. import _fatal

        # A watchdog that ends the process (the custom all-reduce's) leaves the same record.
        _fatal.add_hook(lambda exc_type, message: write_error_file(
            error_file, exitcode=_fatal.EXIT_CODE, exc_type=exc_type, message=message))
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's path in argv[0]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0]
            sys.argv = [script, *argv[1:]]
            # As `python script.py` does: the script's folder, not ours, leads sys.path.
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if error_file and exc.code not in (None, 0):
            code = exc.code if isinstance(exc.code, int) else 1
            message = "" if isinstance(exc.code, int) else str(exc.code)
            write_error_file(error_file, exitcode=code, message=message)
        if exc.code not in (None, 0):
            freeze_for_exit()  # the launcher acts once this process has ended
        raise
    except KeyboardInterrupt:
        raise  # Python reports it by dying of SIGINT; keep that exit status
    except BaseException as exc:
        tb = _user_frames(exc.__traceback__)
        exc.__traceback__ = tb  # what Python prints follows the exception's own traceback
        if error_file:
            kind = type(exc)
            name = (kind.__qualname__ if kind.__module__ in ("builtins", "__main__")
                    else f"{kind.__module__}.{kind.__qualname__}")
            write_error_file(error_file, exitcode=1, exc_type=name, message=str(exc),
                             traceback="".join(traceback.format_exception(kind, exc, tb)))
        sys.excepthook(type(exc), exc, tb)  # what an uncaught exception prints, minus our frames
        sys.stderr.flush()
        freeze_for_exit()
        sys.exit(1)


def _user_frames(tb):
    """``tb`` without its leading frames from this bootstrap and from runpy."""
    here = os.path.abspath(__file__)
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if os.path.abspath(filename) != here and "runpy" not in filename:
            break
        tb = tb.tb_next
    return tb


def _export_detected_launch_info() -> None:
    """Under a scheduler (no RANK set by a launcher), export what it implies."""
    if os.environ.get("RANK") and os.environ.get("WORLD_SIZE"):
        return
    from ..runtime import detect_environment

    detected = detect_environment(os.environ)
    if detected is not None:
        os.environ.update(detected.to_env())


if __name__ == "__main__":
    main()
