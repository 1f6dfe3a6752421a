"""A member that dies mid-run: the run goes on with training.min_members, and says who dropped when."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from consortium.processes import signal_processes_under, stop_processes_under
from tests.helpers import console_script, poc_kit, relocated_config, updates_received, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.fault]

ROUNDS = 3
KILLED_AFTER = 0
"""The member is killed once the server has recorded its update of this round. The server records an
update as it arrives, before the round is aggregated, so the member still owes ROUNDS - 1 - KILLED_AFTER
rounds then (2: two aggregations and two rounds of its own training, about a second at the least), and
the kill follows within a poll of the records (0.05 s). Each round after the kill waits out
training.round_deadline for it, so a wider margin would cost that much per round."""


class Crash(threading.Thread):
    """Kill ``member``'s client and job process once the server has its update of ``after_round``: SIGKILL,
    as a crash does (SIGTERM lets the job process finish a round in flight, so the round it dies in would
    depend on timing). A thread of the test process, while the command runs in a process of its own: the
    command's work (imports, MLflow, its progress bar) does not hold up the look at the records."""

    def __init__(self, flare: Path, member: str, *, after_round: int, done: threading.Event) -> None:
        super().__init__(name=f"crash-{member}", daemon=True)
        self.flare, self.member, self.after_round, self.done = flare, member, after_round, done
        self.killed_at: float | None = None
        self.updates_before: int | None = None  # the member's updates the server had recorded when it died
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._crash()
        except BaseException as exc:  # seen by the test, not lost with the thread
            self.error = exc

    def _crash(self) -> None:
        received = wait_until(
            lambda: updates_received(self.flare, self.member) > self.after_round,
            timeout=600,
            interval=0.05,
            what=f"the server to record {self.member}'s update of round {self.after_round}",
            stop=self.done,
        )
        if not received:
            return  # the run ended first
        # looked up now, not before the run: FLARE builds the POC kits in a folder of its own, then moves them
        kit = wait_until(lambda: poc_kit(self.flare, self.member), timeout=60, interval=0.01, what="the member's kit")
        signal_processes_under(kit, signal.SIGKILL)
        self.killed_at = time.monotonic()
        self.updates_before = updates_received(self.flare, self.member)
        stop_processes_under(kit)  # whatever is left, and waits for it


def _run_with_a_crash(config: Path, out: Path, *, he: str) -> tuple[subprocess.CompletedProcess, Crash]:
    """``consortium run`` on POC through the console script, pharma-b killed after its round-0 update."""
    done = threading.Event()
    crash = Crash(out / "flare", "pharma-b", after_round=KILLED_AFTER, done=done)
    crash.start()
    try:
        run = console_script(["run", "--config", str(config), "--env", "poc", he, "--out", str(out)], timeout=900)
    except BaseException:  # a command that did not end (or a test past its timeout) leaves no FLARE process
        stop_processes_under(out / "flare")
        raise
    finally:
        done.set()
        crash.join(timeout=60)
    if crash.error is not None:
        raise crash.error
    assert crash.killed_at is not None, f"the run ended before pharma-b was killed (exit {run.returncode})"
    assert crash.updates_before < ROUNDS, "pharma-b had sent its last round when it was killed: nothing to miss"
    return run, crash


def test_a_dead_member_drops_out_and_the_run_completes(tiny_consortium: Path, tmp_path: Path, capsys):
    training = {"rounds": ROUNDS, "min_members": 1, "round_deadline": 30}
    config = relocated_config(tiny_consortium, tmp_path, training=training)
    out = tmp_path / "run"
    run, crash = _run_with_a_crash(config, out, he="--he")
    with capsys.disabled():
        print(f"\nfault timing: member killed -> run completed without it {time.monotonic() - crash.killed_at:.1f} s")
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    # killed once the server had its round-0 update; a round this fast may have let one more in first
    dropped = report["dropped"]
    assert set(dropped) == {"pharma-b"} and dropped["pharma-b"] in (1, 2)
    first_missed = dropped["pharma-b"]
    assert report["members"]["pharma-b"]["tasks"]["b_pfs"]["federated"] is None
    assert report["members"]["pharma-a"]["tasks"]["a_pfs"]["federated"] is not None
    both, alone = [["pharma-a", "pharma-b"]] * first_missed, [["pharma-a"]] * (3 - first_missed)
    assert [sorted(r["sites"]) for r in report["rounds"]] == [*both, *alone]
    assert f"pharma-b dropped out in round {first_missed}" in (out / "report.md").read_text()
    assert f"pharma-b dropped out in round {first_missed}" in run.stdout


def test_too_few_members_left_is_a_clear_error(tiny_consortium: Path, tmp_path: Path, capsys):
    training = {"rounds": ROUNDS, "round_deadline": 30}  # every member needed
    config = relocated_config(tiny_consortium, tmp_path, training=training)
    out = tmp_path / "run"
    started = time.monotonic()
    run, crash = _run_with_a_crash(config, out, he="--no-he")
    with capsys.disabled():
        print(f"\nfault timing: member killed (too few left) -> error {time.monotonic() - crash.killed_at:.1f} s")
    assert run.returncode == 1
    assert "pharma-b" in run.stderr and "min_members" in run.stderr
    assert time.monotonic() - started < 600
    assert stop_processes_under(out / "flare") == 0
