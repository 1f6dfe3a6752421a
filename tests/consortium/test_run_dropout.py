"""A member that dies mid-run: the run goes on with training.min_members, and says who dropped when."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from consortium.cli import main
from consortium.flare_env import signal_processes_under, stop_processes_under
from consortium.results import read_records

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _config(tiny_consortium: Path, tmp_path: Path, **training) -> Path:
    raw = yaml.safe_load(tiny_consortium.read_text())
    raw["training"].update(training)
    raw["panel"]["file"] = str(tiny_consortium.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(tiny_consortium.parent / member["data"])
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _kill_after_round(flare: Path, member: str, round_: int, done: threading.Event, killed: list | None = None) -> None:
    """Kill ``member``'s client (and its job process) once the server has its update of ``round_``: SIGKILL,
    as a crash does (SIGTERM lets the job process finish a round in flight, so the round it dies in would
    depend on timing)."""
    while not done.is_set():
        if len(read_records(flare).get(member, [])) > round_:
            for kit in flare.rglob(member):
                if (kit / "startup").is_dir():
                    signal_processes_under(kit, signal.SIGKILL)
                    stop_processes_under(kit)  # whatever is left, and waits for it
            if killed is not None:
                killed.append(time.monotonic())
            return
        time.sleep(0.1)


def test_a_dead_member_drops_out_and_the_run_completes(tiny_consortium: Path, tmp_path: Path, capsys):
    config = _config(tiny_consortium, tmp_path, rounds=3, min_members=1, round_deadline=30)
    out = tmp_path / "run"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_after_round, args=(out / "flare", "pharma-b", 0, done, killed), daemon=True)
    killer.start()
    try:
        code = main(["run", "--config", str(config), "--env", "poc", "--he", "--out", str(out)])
    finally:
        done.set()
    if killed:
        with capsys.disabled():
            print(f"\nfault timing: member killed -> run completed without it {time.monotonic() - killed[0]:.1f} s")
    assert code == 0, capsys.readouterr().err
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
    assert f"pharma-b dropped out in round {first_missed}" in capsys.readouterr().out


def test_too_few_members_left_is_a_clear_error(tiny_consortium: Path, tmp_path: Path, capsys):
    config = _config(tiny_consortium, tmp_path, rounds=3, round_deadline=30)  # every member needed
    out = tmp_path / "run"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_after_round, args=(out / "flare", "pharma-b", 0, done, killed), daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        code = main(["run", "--config", str(config), "--env", "poc", "--no-he", "--out", str(out)])
    finally:
        done.set()
    if killed:
        with capsys.disabled():
            print(f"\nfault timing: member killed (too few left) -> error {time.monotonic() - killed[0]:.1f} s")
    err = capsys.readouterr().err
    assert code == 1
    assert "pharma-b" in err and "min_members" in err
    assert time.monotonic() - started < 600
    assert stop_processes_under(out / "flare") == 0
