"""The control agent's stack-dump signal is never fatal to the rank it is sent to."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from distrib.control.stacks import DUMP_SIGNAL


@pytest.mark.skipif(DUMP_SIGNAL is None, reason="no real-time signals here")
def test_a_rank_whose_dumps_cannot_register_ignores_the_signal_and_says_so(tmp_path):
    # The stack file cannot be created (its folder is gone, as after a launcher's cleanup).
    code = textwrap.dedent(f"""
        import os, time
        from distrib.control import agent
        from distrib.control.stacks import DUMP_SIGNAL
        print(agent._register_faulthandler({str(tmp_path / "gone" / "rank0.stacks")!r}), flush=True)
        os.kill(os.getpid(), DUMP_SIGNAL)
        time.sleep(0.2)
        print("alive", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.split() == ["False", "alive"]


@pytest.mark.skipif(DUMP_SIGNAL is None, reason="no real-time signals here")
def test_a_rank_whose_dumps_registered_writes_its_stacks(tmp_path):
    stacks = tmp_path / "rank0.stacks"
    code = textwrap.dedent(f"""
        import os, time
        from distrib.control import agent
        from distrib.control.stacks import DUMP_SIGNAL
        print(agent._register_faulthandler({str(stacks)!r}), flush=True)
        os.kill(os.getpid(), DUMP_SIGNAL)
        time.sleep(0.2)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["True"], result.stderr
    assert "File" in stacks.read_text()
