"""Every command the README shows runs as written (after the quick start's two commands).

Each ``distrib-run``, ``python`` and ``python -m distrib.bench`` command of the README
(its ``sh`` blocks and its inline code) must name files that exist and options their
programs accept; the cheap CPU ones are run here for real. GPU-only commands are
checked for their files and options only.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.cli import build_parser, options_from

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    found = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        found += [line.split("#")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`((?:distrib-run|python) [^`]+)`", README)
    return sorted({c for c in found if c.startswith(("distrib-run ", "python "))})


COMMANDS = _commands()


def test_the_readme_shows_commands():
    assert "distrib-run --nprocs 4 examples/train.py --lr 3e-4" in COMMANDS
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_names_what_exists_with_options_it_accepts(command):
    argv = shlex.split(command)
    if argv[0] == "distrib-run":
        program_command, _, _ = options_from(build_parser({}).parse_args(argv[1:]))
        if not program_command.module:
            assert (REPO / program_command.program).exists(), command
        return
    assert argv[0] == "python", command
    if argv[1:3] == ["-m", "distrib.bench"]:
        from distrib.bench.__main__ import BENCHMARKS

        if argv[3] in ("--help", "-h"):
            return
        assert argv[3] in BENCHMARKS, command
        from importlib import import_module

        module = import_module(BENCHMARKS[argv[3]])
        if hasattr(module, "build_parser"):
            module.build_parser().parse_args(argv[4:])
        else:  # its parser lives in main(): its options, then --help, which exits 0
            with pytest.raises(SystemExit) as done:
                module.main([*argv[4:], "--help"])
            assert done.value.code == 0, command
        return
    if argv[1:3] == ["-m", "pytest"]:
        return
    script = REPO / argv[1]
    assert script.exists(), command
    if script.name == "tensor_parallel_decode.py":
        sys.path.insert(0, str(script.parent))
        try:
            from importlib import import_module

            import_module("tensor_parallel_decode").build_parser().parse_args(argv[2:])
        finally:
            sys.path.remove(str(script.parent))


@pytest.mark.parametrize("command", ["distrib-run --nprocs 4 examples/train.py --lr 3e-4",
                                     "python -m distrib.bench --help"])
def test_the_cpu_commands_run(command):
    argv = shlex.split(command)
    argv = ([sys.executable, "-m", "distrib.cli"] if argv[0] == "distrib-run" else [sys.executable]) + argv[1:]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
