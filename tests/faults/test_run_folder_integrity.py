"""A run folder holds one run, and ``--resume`` continues that run only: through the CLI, a resume with an
edited config or data file, a second run into a finished folder, ``--force``, a stale lock and a torn audit
line. One simulated run (``--force`` into a folder an earlier run left) serves every test; the others copy
it and take less than a second each, apart from the resume that releases the kept rounds (no FLARE)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from consortium.audit import AuditLog
from consortium.cli import main
from consortium.run_folder import LOCK_FILE, RunFolderError, run_lock
from consortium.run_state import config_changes
from tests.helpers import console_script

pytestmark = pytest.mark.fault

RUN = ["--env", "sim", "--no-he", "--rounds", "1"]
OLD_ENDPOINT, NEW_ENDPOINT = "a_response", "response_a"
HOLD_LOCK = (
    "import fcntl, sys, time\n"
    "handle = open(sys.argv[1], 'a+')\n"
    "fcntl.flock(handle, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def _flat(text: str) -> str:
    """Rich wraps long lines; compare with the whitespace collapsed."""
    return " ".join(text.split())


def _listing(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` (hidden ones too) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_config(source: Path, target: Path, edit) -> Path:
    """``source`` with ``edit(raw)`` applied, written to ``target`` (member and panel paths made absolute)."""
    raw = yaml.safe_load(source.read_text())
    raw["panel"]["file"] = str(source.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(source.parent / member["data"])
    edit(raw)
    target.write_text(yaml.safe_dump(raw))
    return target


def _rename_endpoint(raw: dict) -> None:
    for task in raw["members"][0]["tasks"]:
        if task["name"] == OLD_ENDPOINT:
            task["name"] = NEW_ENDPOINT


def _earlier_run(out: Path) -> None:
    """What an interrupted earlier run with another config leaves: its state, kept job, tables (one of an
    endpoint the new config no longer has), a signed audit log, and the lock file of its dead command."""
    (out / "jobs" / "seed0" / "part00").mkdir(parents=True)
    (out / "jobs" / "seed0" / "part00" / "published.jsonl").write_text('{"site": "pharma-a", "round": 0}\n')
    (out / "run_state.json").write_text(json.dumps({"arguments": {}, "jobs": {}}))
    (out / "biomarkers").mkdir()
    (out / "biomarkers" / f"statistics_{OLD_ENDPOINT}.csv").write_text("feature,statistic\nSTAT1,1.0\n")
    (out / "report.json").write_text("{}")
    AuditLog(out / "audit.jsonl").append("job_submitted", job_id="earlier-job")
    (out / LOCK_FILE).write_text(f"{_dead_pid()} 1")


@pytest.fixture(scope="module")
def forced_run(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``consortium run --force`` (the console script) into a folder an earlier run left, with one endpoint
    renamed: the run every test of this module starts from."""
    root = tmp_path_factory.mktemp("run_folder_integrity")
    consortium = root / "consortium"
    folders = lambda d, names: [n for n in names if Path(d, n).is_dir()]  # noqa: E731 - the data and panel only
    shutil.copytree(tiny_consortium.parent, consortium, ignore=folders)
    config = _write_config(consortium / tiny_consortium.name, consortium / "consortium.yaml", _rename_endpoint)
    out = root / "run"
    out.mkdir()
    _earlier_run(out)
    stale_pid = int((out / LOCK_FILE).read_text().split()[0])
    started = time.time()
    done = console_script(["run", "--config", str(config), *RUN, "--out", str(out), "--force"], timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"config": config, "out": out, "done": done, "started": started, "stale_pid": stale_pid}


def _mark_interrupted(out: Path) -> None:
    """The run state as a command killed after its server stored the last round leaves it."""
    path = out / "run_state.json"
    state = json.loads(path.read_text())
    state["jobs"]["seed0"][-1]["status"] = "interrupted"
    path.write_text(json.dumps(state, indent=2))


def _copy(forced_run: dict, to: Path) -> Path:
    shutil.copytree(forced_run["out"], to, symlinks=True)
    return to


# -- --force, and a second run ----------------------------------------------------------------------


@pytest.mark.slow
def test_force_empties_the_folder_first_and_no_earlier_file_survives(forced_run: dict):
    out, said = forced_run["out"], _flat(forced_run["done"].stdout)
    assert f"--force: emptied {out} before the run (audit.jsonl, audit.jsonl.head, " in said
    assert "biomarkers, jobs and 2 more)" in said
    assert f"took over the run lock of pid {forced_run['stale_pid']}, which ended without releasing it" in said
    assert not (out / "biomarkers" / f"statistics_{OLD_ENDPOINT}.csv").exists()
    assert (out / "biomarkers" / f"statistics_{NEW_ENDPOINT}.csv").is_file()
    earlier = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime < forced_run["started"]]
    assert earlier == []  # every file in the folder is the new run's
    assert not (out / LOCK_FILE).exists()  # released: the next command finds no lock
    entries = AuditLog(out / "audit.jsonl").entries()
    assert "earlier-job" not in {e["job_id"] for e in entries} and entries[-1]["event"] == "model_released"


@pytest.mark.slow
def test_a_second_run_or_stats_into_a_finished_folder_is_refused_and_writes_nothing(forced_run: dict, capsys):
    config, out = forced_run["config"], forced_run["out"]
    before = _listing(out)
    started = time.monotonic()
    assert main(["run", "--config", str(config), *RUN, "--out", str(out)]) == 2
    ran = _flat(capsys.readouterr().err)
    assert main(["stats", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out)]) == 2
    stats = _flat(capsys.readouterr().err)
    refused_in = time.monotonic() - started
    with capsys.disabled():
        print(f"\nfault timing: a second run and stats into a finished folder -> both refused in {refused_in:.2f} s")
    assert f"{out} holds a finished run (" in ran and "--resume" in ran and "--force" in ran
    assert "another --out" in ran and "Nothing was written" in ran
    assert f"{out} holds a finished run (" in stats and "--force" in stats and "--resume" not in stats
    assert _listing(out) == before


# -- --resume checks the config ---------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_another_config_or_data_is_refused_naming_each_change(forced_run: dict, capsys):
    """A learning rate changed, a member removed and an endpoint renamed in the same consortium.yaml, then a
    member's data file changed: each refused before anything runs, each change named, nothing written."""
    config, out = forced_run["config"], forced_run["out"]
    original = config.read_text()
    before = _listing(out)

    def edit(raw: dict) -> None:
        raw["training"]["learning_rate"] = 0.5
        raw["members"] = [m for m in raw["members"] if m["name"] != "pharma-b"]
        for task in raw["members"][0]["tasks"]:
            if task["name"] == "a_pfs":
                task["name"] = "pfs"

    try:
        _write_config(config, config, edit)
        started = time.monotonic()
        code = main(["run", "--config", str(config), *RUN, "--out", str(out), "--resume"])
        refused_in = time.monotonic() - started
    finally:
        config.write_text(original)
    err = _flat(capsys.readouterr().err)
    assert code == 2, err
    assert f"{out}: --resume continues the run started there, but the config is not the one it started with" in err
    assert "training.learning_rate: 0.001 -> 0.5" in err
    assert "member 'pharma-b' removed" in err
    assert "endpoint 'a_pfs' renamed to 'pfs'" in err
    assert "endpoint 'b_pfs' removed (held by pharma-b)" in err
    assert "Nothing was run or written" in err
    assert _listing(out) == before

    data = config.parent / "pharma-a.h5ad"
    kept = data.read_bytes()
    try:
        data.write_bytes(kept + b"\0")
        code = main(["run", "--config", str(config), *RUN, "--out", str(out), "--resume"])
    finally:
        data.write_bytes(kept)
    err = _flat(capsys.readouterr().err)
    with capsys.disabled():
        print(f"\nfault timing: --resume with an edited consortium.yaml -> refused in {refused_in:.2f} s")
    assert code == 2, err
    assert f"members[pharma-a].data: {data} changed since the run started (size {len(kept)} -> {len(kept) + 1}" in err
    assert "training.learning_rate" not in err
    assert _listing(out) == before


# -- a resume after the last stored round, and a stale lock held by a process left behind -------------


@pytest.mark.slow
def test_resume_after_the_last_round_was_stored_releases_it_taking_over_a_stale_lock(
    forced_run: dict, tmp_path: Path, capfd
):
    out = _copy(forced_run, tmp_path / "run")
    _mark_interrupted(out)
    kept = _listing(out / "jobs")
    lock, dead = out / LOCK_FILE, _dead_pid()
    # the dead command's lock, still held by a process it left behind (the file lock outlives the command)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock.write_text(f"{dead} 1")
        started = time.monotonic()
        code = main(["run", "--config", str(forced_run["config"]), *RUN, "--out", str(out), "--resume"])
        seconds = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    said = _flat(capfd.readouterr().out)
    with capfd.disabled():
        print(f"\nfault timing: --resume after the last stored round -> released in {seconds:.1f} s (no FLARE)")
    assert code == 0, said[-3000:]
    assert f"{out}: took over the run lock of pid {dead}, which is no longer running" in said
    assert "job seed0: every round was stored before it stopped, read from" in said
    assert "federated job" not in said  # nothing was run again
    report = json.loads((out / "report.json").read_text())
    assert set(report["members"]) == {"pharma-a", "pharma-b"} and report["dropped"] == {}
    assert _listing(out / "jobs") == kept
    assert AuditLog(out / "audit.jsonl").entries()[-1]["event"] == "model_released"
    assert not lock.exists()


# -- validate first -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_torn_audit_line_is_refused_before_anything_runs_and_the_kept_jobs_survive(
    forced_run: dict, tmp_path: Path, capsys
):
    out = _copy(forced_run, tmp_path / "run")
    _mark_interrupted(out)
    with open(out / "audit.jsonl", "ab") as log:
        log.write(b'{"index": 99, "timestamp": "2026-')  # a command died while writing an entry
    before = _listing(out)
    config = str(forced_run["config"])
    for extra in (["--resume"], ["--force"], []):
        assert main(["run", "--config", config, *RUN, "--out", str(out), *extra]) == 2, extra
        err = _flat(capsys.readouterr().err)
        assert f"{out / 'audit.jsonl'}: the run folder's audit log does not verify" in err, extra
        assert "the last line is incomplete" in err and "delete its incomplete last line" in err
        assert "Nothing was run, written or deleted" in err
    assert main(["stats", "--config", config, "--env", "sim", "--no-he", "--out", str(out), "--force"]) == 2
    assert "the last line is incomplete" in _flat(capsys.readouterr().err)
    assert _listing(out) == before  # the kept jobs are there for --resume once the line is cut

    cut = _copy(forced_run, tmp_path / "cut")  # the log's last entry gone: its signed head no longer matches
    lines = (cut / "audit.jsonl").read_text().splitlines(keepends=True)
    (cut / "audit.jsonl").write_text("".join(lines[:-1]))
    before = _listing(cut)
    assert main(["run", "--config", config, *RUN, "--out", str(cut), "--force"]) == 2
    err = _flat(capsys.readouterr().err)
    assert f"audit.jsonl.head records entry {len(lines) - 1} but the log ends at {len(lines) - 2}: tail cut" in err
    assert "keep the folder as evidence" in err and "use another --out" in err
    assert _listing(cut) == before


# -- no FLARE ---------------------------------------------------------------------------------------------


def test_a_live_holder_of_the_lock_is_still_refused(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / LOCK_FILE).write_text(str(holder.pid))
        busy = rf"another consortium run \(pid {holder.pid}\) is writing to this folder"
        with pytest.raises(RunFolderError, match=busy), run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # not ours to remove


def test_a_lock_freed_by_its_dead_holder_is_taken_over_in_one_line(tmp_path: Path):
    dead = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(f"{dead} 1")
    said: list[str] = []
    with run_lock(tmp_path, say=said.append):
        with open(tmp_path / LOCK_FILE) as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held now
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert said == [f"{tmp_path}: took over the run lock of pid {dead}, which ended without releasing it"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_config_changes_name_long_lists_by_what_was_added_and_removed():
    features = [f"GENE{i}" for i in range(20)]
    member = {"name": "m1", "data": "/d/m1.h5ad", "tasks": [{"name": "os", "type": "survival", "time": "t"}]}
    digest = {"path": "/d/m1.h5ad", "size": 10, "sha256": "a" * 64}

    def record(panel: list[str], *, sha: str = "a" * 64, tasks=None) -> dict:
        members = [{**member, "tasks": tasks or member["tasks"]}]
        sections = {"panel": {"features": panel}, "members": members}
        return {"digest": "x", "sections": sections, "files": {"members[m1].data": {**digest, "sha256": sha}}}

    was = record(features)
    now = record([*features[1:], "GENE99"], sha="b" * 64, tasks=[{"name": "os", "type": "survival", "time": "t2"}])
    assert config_changes(was, now) == [
        "panel.features: 1 added (GENE99), 1 removed (GENE0)",
        "members[m1].tasks[os].time: t -> t2",
        "members[m1].data: /d/m1.h5ad changed since the run started (size 10 -> 10 bytes, sha256 aaaaaaaaaaaa... "
        "-> bbbbbbbbbbbb...)",
    ]
