"""A run folder takes one run at a time, and SIGTERM stops every FLARE process a run started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consortium.cli import main
from consortium.processes import stop_processes_under
from consortium.run_folder import run_lock
from schema.names import PUBLISHED_FILE
from tests.helpers import wait_until

pytestmark = pytest.mark.fault

STOPS_WITHIN = 20  # seconds from SIGTERM to the command's exit


def test_a_second_run_into_a_busy_folder_is_refused(tiny_consortium: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        code = main(["run", "--config", str(tiny_consortium), "--env", "sim", "--no-he", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "give another --out" in err


def test_the_lock_is_released_after_a_run(tmp_path: Path):
    with run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # would raise if the first one were still held
        pass


@pytest.mark.slow
def test_sigterm_stops_the_run_and_every_flare_process(tiny_consortium: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "consortium.cli",
        "run",
        "--config",
        str(tiny_consortium),
        "--env",
        "sim",
        "--no-he",
        "--out",
        str(out),
        "--rounds",
        "20",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the simulator's sites are running once the first round is recorded
        wait_until(
            lambda: process.poll() is not None or _first_round_recorded(out / "flare"),
            timeout=180,
            interval=0.5,
            what="the first round's record",
        )
        assert process.poll() is None, process.communicate()
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)  # a command that does not exit fails here
        stopped_in = time.monotonic() - sent
    except BaseException:  # no command and no FLARE process outlives a failed test
        if process.poll() is None:
            process.kill()
            process.wait()
        stop_processes_under(out / "flare")
        raise
    with capsys.disabled():
        print(f"\nfault timing: SIGTERM -> exit 130 with its message {stopped_in:.1f} s")
    assert process.returncode == 130
    assert "interrupted; every FLARE process this command started has been stopped" in err
    # at once (0.4-0.8 s in docs/faults.md), not after waiting out one of its own timeouts (the simulator's
    # thread is joined for up to 30 s, FLARE's processes are given 2 s per signal)
    assert stopped_in < STOPS_WITHIN
    assert stop_processes_under(out / "flare") == 0


def _first_round_recorded(flare: Path) -> bool:
    with contextlib.suppress(OSError):  # the simulator writes and moves folders while this looks
        return any(flare.rglob(PUBLISHED_FILE))
    return False


def test_members_on_one_machine_share_its_cores(monkeypatch):
    from consortium.backends.threads import THREAD_VARIABLES, shared_threads

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert shared_threads(3) == dict.fromkeys(THREAD_VARIABLES, "5")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert shared_threads(3) == dict.fromkeys(THREAD_VARIABLES, "1")  # never none
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting is kept
    assert "OMP_NUM_THREADS" not in shared_threads(3)
