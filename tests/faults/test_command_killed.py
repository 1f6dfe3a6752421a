"""`kill -9` of a running `consortium run --env sim`: no FLARE process it started outlives it (the watchdog of
consortium.reaper learns of the death from the kernel and ends them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consortium.processes import processes_naming, stop_processes_under
from consortium.reaper import reaper_for
from consortium.run_state import stored_aggregate
from tests.helpers import relocated_config, wait_until

pytestmark = pytest.mark.fault


@pytest.mark.slow
def test_a_killed_simulated_run_leaves_no_process_behind_within_5_s(tiny_consortium: Path, tmp_path: Path):
    config = relocated_config(tiny_consortium, tmp_path, training={"rounds": 30})
    out = tmp_path / "run"
    command = subprocess.Popen(
        [str(Path(sys.executable).with_name("consortium")), "run", "--config", str(config), "--env", "sim"]
        + ["--no-he", "--out", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    flare = str((out / "flare").resolve())
    try:
        # the simulator's member processes are up (they name the workspace), so the job is under way
        wait_until(lambda: len(processes_naming(flare)) >= 3, timeout=300, what="the simulator's processes")
        command.send_signal(signal.SIGKILL)
        command.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: not processes_naming(flare), timeout=5, interval=0.1, what="FLARE processes to end")
        assert time.monotonic() - killed <= 5.0
    finally:
        if command.poll() is None:
            command.kill()
        stop_processes_under(out / "flare")


def test_the_watchdog_ends_the_processes_under_its_folder_when_its_parent_dies(tmp_path: Path):
    """The mechanism alone: a parent that starts the watchdog and a stand-in 'FLARE' process naming the
    folder, then dies by SIGKILL; the stand-in is ended. A dismissed watchdog ends nothing."""
    folder = tmp_path / "flare"
    folder.mkdir()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from pathlib import Path\n"
            "from consortium.reaper import reaper_for\n"
            f"folder = Path({str(folder)!r})\n"
            "with reaper_for(folder):\n"
            "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', str(folder)],"
            " start_new_session=True)\n"
            "    print('up', flush=True)\n"
            "    time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert parent.stdout.readline().strip() == "up"
        assert wait_until(lambda: processes_naming(str(folder)), timeout=10, what="the stand-in process")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not processes_naming(str(folder)), timeout=5, what="the watchdog to end the stand-in")
    finally:
        if parent.poll() is None:
            parent.kill()
        stop_processes_under(folder)
    # a dismissed watchdog (the command ended normally) leaves the folder's processes alone
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder)])
    try:
        with reaper_for(folder) as watchdog:
            assert watchdog is not None and watchdog.poll() is None
        assert survivor.poll() is None
    finally:
        survivor.kill()
        survivor.wait()


@pytest.mark.slow
def test_a_simulated_run_stopped_by_sigterm_keeps_its_rounds_and_resumes(tiny_consortium: Path, tmp_path: Path):
    """SIGTERM in the simulator keeps what its server stored, as POC does: the message says how to continue,
    and `--resume` finishes the job from there."""
    config = relocated_config(tiny_consortium, tmp_path)
    out = tmp_path / "run"
    args = ["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out), "--rounds", "6"]
    command = subprocess.Popen(
        [str(Path(sys.executable).with_name("consortium")), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: command.poll() is not None or stored_aggregate(out / "flare") is not None,
            timeout=300,
            what="the simulator's server to store a round",
        )
        assert command.poll() is None, command.communicate()
        command.send_signal(signal.SIGTERM)
        _, err = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
        stop_processes_under(out / "flare")
    assert command.returncode == 130, err
    message = " ".join(err.split())
    assert "interrupted; every FLARE process" in message and "run the same command with --resume" in message
    resumed = subprocess.run(
        [str(Path(sys.executable).with_name("consortium")), *args, "--resume"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "report.json").exists()
    # the audit tells it in order: each job's submission before its rounds, the interruption after them
    entries = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    events = [e["event"] for e in entries if e["event"] != "keys_created"]
    kept = next(e["details"]["rounds_done"] for e in entries if e["event"] == "job_interrupted")
    assert events == [
        "job_submitted",
        *["round_completed"] * kept,
        "job_interrupted",
        "job_submitted",
        *["round_completed"] * (6 - kept),
        "model_released",
    ]
    continued = [e["details"] for e in entries if e["event"] == "job_submitted"][1]
    assert continued["first_round"] == kept and continued["continues"]


ROUND_DEADLINE = 60


@pytest.mark.slow
def test_a_dead_simulator_server_ends_the_run_with_its_rounds_kept(tiny_consortium: Path, tmp_path: Path):
    """The simulator's server process killed mid-run: the command does not wait for ever; it ends within the
    round deadline, keeps the rounds the server stored and says how to --resume."""
    # the deadline must outlast a first round on a loaded machine (10 s did not, beside a CPU hog): the
    # server gives up on a round whose updates do not come within it
    config = relocated_config(tiny_consortium, tmp_path, training={"round_deadline": ROUND_DEADLINE})
    out = tmp_path / "run"
    args = ["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out), "--rounds", "400"]
    command = subprocess.Popen(
        [str(Path(sys.executable).with_name("consortium")), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    flare = out / "flare"
    try:
        wait_until(
            lambda: command.poll() is not None or stored_aggregate(flare) is not None,
            timeout=300,
            what="the simulator's server to store a round",
        )
        assert command.poll() is None, command.communicate()
        server = _simulator_server(str(flare.resolve()))
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        _, err = command.communicate(timeout=120)
        ended_in = time.monotonic() - killed
    finally:
        if command.poll() is None:
            command.kill()
        stop_processes_under(flare)
    message = " ".join(err.split())
    assert command.returncode == 1, err
    assert "run the same command with --resume" in message  # the rounds the server stored are kept
    assert ended_in < ROUND_DEADLINE + 30  # the round deadline, then the simulator's processes are ended
    assert not processes_naming(str(flare.resolve()))


def _simulator_server(flare: str) -> int:
    """The simulator's main process, which runs its server (the sites run in processes below it)."""
    pids = processes_naming(flare)
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}
    return next(pid for pid in pids if parents[pid] not in pids)
