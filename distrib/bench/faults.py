"""``python -m distrib.bench faults``: every fault, at every stage, many times over.

A scenario is one fault: rank 0 raising, exiting non-zero (``sys.exit(3)``),
``os._exit(7)``, SIGKILLed or SIGSEGV'd at import, at start, in a barrier, in an
all_gather, in a gloo all-reduce or after returning (in ``atexit``); or the launcher
itself SIGKILLed, SIGTERMed or Ctrl-C'd (SIGINT to its process group, as a terminal
sends it) while its ranks start or wait in a barrier. Each runs through
``distrib.launch`` and through ``distrib-run``, ``--repeat`` times (the issue's
early death, ``os._exit`` at start, ``--early-repeat`` times): races show up only
by repetition. Per scenario it reports:

- the time from the fault (the faulting rank's clock just before it, or the signal
  sent to the launcher) until the launcher has exited and every rank is gone,
  median and maximum;
- orphans: processes of the launch still alive 10 s after the launcher exited;
- misses: runs whose root cause was not rank 0 with the right reason (a rank fault),
  or whose launcher did not end by the signal it got (a launcher fault).

``--sections nodes`` adds two-node launches on this host that lose a node (its
launcher SIGKILLed, or the whole node SIGSTOPped; see :mod:`distrib.bench._fault_nodes`),
``leaks`` adds the load-and-leak run (barriers and broadcasts on 8 ranks,
launches in a row; see :mod:`distrib.bench._fault_leaks`) and ``startup`` the start-up
comparison with ``torch.multiprocessing.spawn``. Writes ``faults.json`` and
``faults.md`` to ``--out`` (``faults-<sections>.*`` for a run without the faults).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

RANK_KINDS = ("raise", "exit", "os_exit", "sigkill", "sigsegv")
RANK_STAGES = ("import", "start", "barrier", "all_gather", "all_reduce", "after_return")
LAUNCHER_SIGNALS = ("sigkill", "sigterm", "sigint")
LAUNCHER_STAGES = ("start", "barrier")
LAUNCHERS = ("launch", "run")
_REASON = {"raise": r"raised RuntimeError: injected fault on rank 0", "exit": r"exited with code 3|raised SystemExit: 3",
           "os_exit": r"exited with code 7", "sigkill": r"killed by signal SIGKILL",
           "sigsegv": r"killed by signal SIGSEGV"}
_ORPHAN_WAIT = 10.0  # seconds after the launcher's exit before a live rank counts as an orphan
MARK_VAR = "DISTRIB_FAULT_RUN"


@dataclass(frozen=True)
class Scenario:
    launcher: str  # "launch" (distrib.launch) or "run" (distrib-run)
    actor: str     # "rank" (rank 0 faults) or "launcher" (the launcher gets a signal)
    kind: str      # a RANK_KINDS entry, or a LAUNCHER_SIGNALS entry
    stage: str

    @property
    def name(self) -> str:
        return f"{self.launcher}/{self.actor}/{self.kind}@{self.stage}"


def scenarios(launchers: Sequence[str]) -> list[Scenario]:
    found = []
    for launcher in launchers:
        for kind in RANK_KINDS:
            for stage in RANK_STAGES:
                if stage == "after_return" and kind in ("raise", "exit"):
                    continue  # Python ignores an exception (SystemExit too) in atexit: no fault
                found.append(Scenario(launcher, "rank", kind, stage))
        for kind in LAUNCHER_SIGNALS:
            for stage in LAUNCHER_STAGES:
                found.append(Scenario(launcher, "launcher", kind, stage))
    return found


def _command(launcher: str, nprocs: int) -> list[str]:
    if launcher == "launch":
        return [sys.executable, "-c",
                "import distrib; from distrib.bench import _fault_rank as f; "
                f"distrib.launch(f.target, nprocs={nprocs})"]
    from . import _fault_rank

    return [sys.executable, "-m", "distrib.cli", "--nprocs", str(nprocs), _fault_rank.__file__]


def marked_processes(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``DISTRIB_FAULT_RUN=mark``."""
    needle = f"{MARK_VAR}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X"):
                    continue
        except (OSError, IndexError):
            continue
        found.append(int(entry))
    return found


def run_once(scenario: Scenario, nprocs: int) -> dict:
    """One run of ``scenario``; returns seconds (fault to all gone), orphans and whether it was named."""
    mark = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="distrib-fault-") as folder:
        stage = scenario.stage if scenario.actor == "rank" else (
            "hold" if scenario.stage == "barrier" else "start_hold")
        env = {**os.environ, MARK_VAR: mark, "DISTRIB_FAULT_DIR": folder,
               "DISTRIB_FAULT_KIND": scenario.kind if scenario.actor == "rank" else "none",
               "DISTRIB_FAULT_STAGE": stage, "PYTHONUNBUFFERED": "1"}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTRIB_LAUNCH_ID"):
            env.pop(name, None)
        err_path = os.path.join(folder, "launcher.err")
        with open(err_path, "wb") as err:
            launcher = subprocess.Popen(_command(scenario.launcher, nprocs), env=env,
                                        stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)  # its own group: a terminal's Ctrl-C
            fault_at = None
            if scenario.actor == "launcher":
                fault_at = _signal_launcher(launcher, scenario, folder, nprocs)
            try:
                launcher.wait(timeout=120)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            exited_at = time.time()
        gone_at, orphans = _wait_gone(mark, exited_at)
        stderr = open(err_path, errors="replace").read()
        if fault_at is None:
            stamps = [float(open(os.path.join(folder, n)).read()) for n in os.listdir(folder)
                      if n.startswith("fault.")]
            fault_at = min(stamps) if stamps else None
        named, detail = _named(scenario, launcher.returncode, stderr)
        return {"seconds": None if fault_at is None else max(exited_at, gone_at) - fault_at,
                "orphans": orphans, "named": named, "detail": detail,
                "returncode": launcher.returncode}


def _signal_launcher(launcher: subprocess.Popen, scenario: Scenario, folder: str, nprocs: int) -> float:
    """Wait for the stage, then send the launcher its signal; returns when it was sent."""
    if scenario.stage == "start":
        time.sleep(0.3)  # the ranks are being started, or import
    else:
        deadline = time.monotonic() + 60
        ready = [os.path.join(folder, f"ready.{r}") for r in range(1, nprocs)]
        while not all(os.path.exists(p) for p in ready) and time.monotonic() < deadline:
            if launcher.poll() is not None:
                break
            time.sleep(0.02)
        time.sleep(0.2)  # inside the barrier by now
    signum = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[scenario.kind]
    sent = time.time()
    try:
        if signum == signal.SIGINT:
            os.killpg(launcher.pid, signum)  # what a terminal's Ctrl-C does: the foreground group
        else:
            launcher.send_signal(signum)
    except ProcessLookupError:
        pass
    return sent


def _wait_gone(mark: str, exited_at: float) -> tuple[float, int]:
    """When the last marked process was gone, and how many outlived the orphan wait (killed then)."""
    while True:
        left = marked_processes(mark)
        now = time.time()
        if not left:
            return now, 0
        if now - exited_at > _ORPHAN_WAIT:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return now, len(left)
        time.sleep(0.02)


def _named(scenario: Scenario, code: int, stderr: str) -> tuple[bool, str]:
    if scenario.actor == "launcher":
        signum = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[scenario.kind]
        ok = code in (-signum, 128 + signum)
        return ok, "" if ok else f"launcher exit status {code}, expected {-signum} or {128 + signum}"
    root = re.search(r"^.*rank (\d+)\b.*(?:\(root cause\)|\[root cause\]).*$", stderr, re.M)
    if root is None:
        return False, f"no root cause in the launcher's output (exit {code}): {stderr[-300:]!r}"
    ok = root.group(1) == "0" and re.search(_REASON[scenario.kind], root.group(0)) is not None
    return ok, "" if ok else root.group(0).strip()


def summarize(name: str, runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    return {"scenario": name, "runs": len(runs),
            "median_s": statistics.median(seconds) if seconds else None,
            "max_s": max(seconds) if seconds else None,
            "over_2s": sum(1 for s in seconds if s > 2.0) + sum(1 for r in runs if r["seconds"] is None),
            "orphans": sum(r["orphans"] for r in runs),
            "misnamed": sum(1 for r in runs if not r["named"]),
            "examples": sorted({r["detail"] for r in runs if r["detail"]})[:3]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distrib.bench faults",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=3, help="ranks per launch (default 3)")
    parser.add_argument("--repeat", type=int, default=20, help="runs of each scenario (default 20)")
    parser.add_argument("--early-repeat", type=int, default=100,
                        help="runs of the early death (os._exit at start; default 100)")
    parser.add_argument("--launchers", default="launch,run", help="launch, run, or both (default)")
    parser.add_argument("--only", default=None, help="a regular expression on scenario names")
    parser.add_argument("--sections", default="faults,nodes,leaks,startup",
                        help="faults, nodes, leaks, startup (default: all four)")
    parser.add_argument("--leak-iterations", type=int, default=10_000,
                        help="barriers and broadcasts on 8 ranks in the leaks section (default 10000)")
    parser.add_argument("--leak-launches", type=int, default=200,
                        help="launches in a row in the leaks section (default 200)")
    parser.add_argument("--startup-runs", type=int, default=7, help="runs of each start-up contender")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sections = set(args.sections.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="distrib-bench-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "python": platform.python_version(), "commit": _commit(), "nprocs": args.nprocs,
            "repeat": args.repeat, "early_repeat": args.early_repeat}
    report: dict = {"meta": meta}
    if "faults" in sections:
        rows = []
        for scenario in scenarios(args.launchers.split(",")):
            if args.only and not re.search(args.only, scenario.name):
                continue
            early = scenario.actor == "rank" and scenario.kind == "os_exit" and scenario.stage == "start"
            runs = [run_once(scenario, args.nprocs) for _ in range(args.early_repeat if early else args.repeat)]
            rows.append(summarize(scenario.name, runs))
            print(_row_text(rows[-1]), flush=True)
        report["faults"] = rows
    if "nodes" in sections:
        from ._fault_nodes import nodes

        report["nodes"] = nodes(repeat=args.repeat)
    if "leaks" in sections:
        from ._fault_leaks import leaks

        report["leaks"] = leaks(iterations=args.leak_iterations, launches=args.leak_launches)
        print(json.dumps(report["leaks"], indent=1), flush=True)
    if "startup" in sections:
        from ._fault_leaks import startup

        report["startup"] = startup(runs=args.startup_runs)
        print(json.dumps(report["startup"], indent=1), flush=True)
    stem = "faults" if "faults" in sections else "faults-" + "-".join(sorted(sections))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


def _row_text(row: dict) -> str:
    def s(v):
        return "-" if v is None else f"{v:.2f}"
    return (f"{row['scenario']:<34} runs {row['runs']:>3}  median {s(row['median_s'])}s  max {s(row['max_s'])}s  "
            f">2s {row['over_2s']}  orphans {row['orphans']}  misnamed {row['misnamed']}"
            + (f"  e.g. {row['examples'][0]}" if row["examples"] else ""))


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# Fault suite (`python -m distrib.bench faults`)", "",
             f"{meta['date']} · {meta['machine']} · Python {meta['python']} · commit {meta['commit']} · "
             f"{meta['nprocs']} ranks per launch", ""]
    rows = report.get("faults")
    if rows:
        lines += ["Time from the fault to the launcher's exit with every rank gone; orphans: processes "
                  f"of the launch alive {_ORPHAN_WAIT:g}s after that exit; misnamed: root cause not rank 0 "
                  "with the right reason (or, for a launcher fault, an exit status other than its signal's).",
                  "", "| scenario | runs | median s | max s | over 2 s | orphans | misnamed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['scenario']} | {r['runs']} | {_num(r['median_s'])} | {_num(r['max_s'])} | "
                         f"{r['over_2s']} | {r['orphans']} | {r['misnamed']} |")
        total = sum(r["runs"] for r in rows)
        lines += ["", f"Totals over {total} runs: {sum(r['over_2s'] for r in rows)} over 2 s, "
                      f"{sum(r['orphans'] for r in rows)} orphans, {sum(r['misnamed'] for r in rows)} misnamed.", ""]
        bad = [r for r in rows if r["examples"]]
        for r in bad:
            lines.append(f"- {r['scenario']}: {'; '.join(r['examples'])}")
        if bad:
            lines.append("")
    rows = report.get("nodes")
    if rows:
        lines += ["## nodes", "", "Two `distrib-run` on this host as node 0 and node 1 (2 ranks each, waiting in a "
                  "barrier); one node's launcher SIGKILLed, or its launcher and ranks SIGSTOPped. Time from the "
                  "fault until the other node's launcher has exited and every process of the launch is gone; "
                  "misnamed: the survivor's error does not name the lost node.", "",
                  "| scenario | runs | median s | max s | bound s | over bound | orphans | misnamed |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['scenario']} | {r['runs']} | {_num(r['median_s'])} | {_num(r['max_s'])} | "
                         f"{r['bound_s']:g} | {r['over_bound']} | {r['orphans']} | {r['misnamed']} |")
        lines += [""] + [f"- {r['scenario']}: {'; '.join(r['examples'])}" for r in rows if r["examples"]] + [""]
    for key in ("leaks", "startup"):
        if key in report:
            lines += [f"## {key}", "", "```json", json.dumps(report[key], indent=1), "```", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
