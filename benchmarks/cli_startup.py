"""How long the ``consortium`` command takes to start: the fixed cost a user pays on every call.

Runs each command in a fresh subprocess ``--repeats`` times (default 5) and prints the median, min and max
wall-clock seconds and the median CPU seconds (user + system: what the command costs without the wait for
a core on a busy machine); the slow part is importing libraries, so ``--help`` should not wait for torch, NVFlare
or MLflow. Commands: ``--help``, ``--version``, ``init``, ``synth`` (2 members x 60 samples x 120 features)
and ``data check`` on that consortium. A command that fails (e.g. one that does not exist yet) is shown
with its exit code instead of a time (exit 1, a failed check, counts as a result).

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5] [--consortium PATH_TO_CONSOLE_SCRIPT]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _console_script(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    beside = Path(sys.executable).with_name("consortium")
    found = str(beside) if beside.exists() else shutil.which("consortium")
    return [found] if found else [sys.executable, "-m", "consortium.cli"]


def _synth(out: Path) -> list[str]:
    return ["synth", "--out", str(out), "--members", "2", "--sizes", "60,60", "--features", "120"]


def _time_once(command: list[str]) -> tuple[float, float, int, str]:
    """Wall-clock and CPU (user + system) seconds of one run, its exit code and last stderr line. On a busy
    machine the wall clock includes waiting for a core; the CPU time does not."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode, (done.stderr.strip().splitlines()[-1:] or [""])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (median reported)")
    parser.add_argument("--consortium", default=None, help="the console script to time (default: the venv's)")
    args = parser.parse_args(argv)
    cli = _console_script(args.consortium)
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as scratch:
        root = Path(scratch)
        fixture = root / "fixture"
        setup = subprocess.run([*cli, *_synth(fixture)], capture_output=True, text=True, check=False)
        if setup.returncode != 0:
            print(f"setup 'consortium synth' failed ({setup.returncode}): {setup.stderr.strip()}", file=sys.stderr)
            return 1
        check = ["data", "check", "--config", str(fixture / "consortium.yaml"), "--member", "pharma-a"]
        cases = {
            "--help": lambda i: ["--help"],
            "--version": lambda i: ["--version"],
            "init": lambda i: ["init", "--out", str(root / f"init-{i}.yaml")],
            "synth (2 x 60 x 120)": lambda i: _synth(root / f"synth-{i}"),
            "data check": lambda i: check,
        }
        print(f"{' '.join(cli)}: {args.repeats} runs each, seconds; load average {os.getloadavg()[0]:.1f}")
        print(f"{'command':<22} {'median':>7} {'min':>7} {'max':>7} {'cpu':>7}")
        for name, make in cases.items():
            walls, cpus, codes, last = [], [], set(), ""
            for i in range(args.repeats):
                wall, cpu, code, last = _time_once([*cli, *make(i)])
                walls.append(wall)
                cpus.append(cpu)
                codes.add(code)
            if codes - {0, 1}:  # 1 is a verdict ('data check': not fit), 2 a usage error
                print(f"{name:<22} {'failed':>7} exit {sorted(codes)}: {last[:70]}")
                continue
            row = f"{statistics.median(walls):7.2f} {min(walls):7.2f} {max(walls):7.2f} {statistics.median(cpus):7.2f}"
            print(f"{name:<22} {row}")
        print(f"median, min, max: wall clock; cpu: median user + system; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
