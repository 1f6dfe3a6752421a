"""The simulator's end: its job's marks read, and what is left of it ended once the job has ended."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from consortium.backends import sim as simulator
from consortium.backends.sim import Ending, Simulator, _mark, _results_complete
from consortium.processes import processes_naming
from schema.names import JOB_ENDED_FILE
from tests.helpers import wait_until


def _write_mark(logs: Path, **mark) -> Path:
    path = logs / "server" / "simulate_job" / JOB_ENDED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": "simulate_job", "fatal": False, **mark}))
    return path


def test_an_earlier_runs_mark_is_not_this_runs(tmp_path):
    path = _write_mark(tmp_path, results_at=1.0, ended_at=2.0)
    old = time.time() - 60
    os.utime(path, (old, old))
    assert _mark(tmp_path, since=time.time() - 1) == {}
    assert _mark(tmp_path, since=old - 1)["ended_at"] == 2.0


def test_results_are_complete_only_without_a_fatal_error():
    assert not _results_complete({})
    assert _results_complete({"results_at": 1.0, "fatal": False})
    assert not _results_complete({"results_at": 1.0, "fatal": True})


def _sleeper(workspace: Path) -> tuple[subprocess.Popen, Simulator]:
    """A process naming the workspace (as FLARE's do), awaited by a thread (as the simulator is)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(workspace)])
    simulator = Simulator(process.wait)
    simulator.thread.start()
    return process, simulator


def test_finish_waits_for_the_jobs_end_then_ends_the_lingering_simulator(tmp_path, caplog, monkeypatch):
    workspace = tmp_path / "flare"
    logs = workspace / "job"
    looks = []

    def read_mark(folder: Path, *, since: float) -> dict:  # the end marks the finisher reads, kept in order
        looks.append(_mark(folder, since=since))
        return looks[-1]

    monkeypatch.setattr(simulator, "_mark", read_mark)
    process, sleeper = _sleeper(workspace)
    ending = Ending(sleeper, workspace=workspace, logs=logs, since=time.time() - 1)
    _write_mark(logs, results_at=time.time())
    finisher = threading.Thread(target=ending.finish)
    with caplog.at_level(logging.WARNING, logger="consortium.backends.sim"):
        finisher.start()
        # it read the mark, found the results but no end, and looked again: it waits
        wait_until(lambda: len(looks) >= 2, timeout=30, what="the finisher to look at the job's mark twice")
        assert finisher.is_alive() and process.poll() is None  # the job has not ended: waited for
        _write_mark(logs, results_at=time.time(), ended_at=time.time())
        finisher.join(10)
    assert not finisher.is_alive() and process.poll() is not None
    assert not ending.running and not processes_naming(str(workspace.resolve()))
    assert not caplog.records  # ended on purpose: no failure reported


def test_a_failure_after_the_results_is_logged(tmp_path, caplog):
    def fail() -> None:
        raise RuntimeError("rc 1")

    simulator = Simulator(fail)
    simulator.thread.start()
    simulator.thread.join()
    ending = Ending(simulator, workspace=tmp_path, logs=tmp_path, since=time.time())
    with caplog.at_level(logging.WARNING, logger="consortium.backends.sim"):
        ending.finish()
    assert "failed after its job's results were complete: rc 1" in caplog.text
