"""POC: how the command sees that a restarted member is back while a job runs (no FLARE processes here:
the processes are stand-ins with FLARE's command lines; the POC fault test runs the real thing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consortium.backends import rejoin as poc_rejoin
from consortium.backends.rejoin import MemberProcesses, RejoinWatch, member_processes, snapshot_job
from consortium.results import read_records
from consortium.run_state import stored_round
from schema.config import load_config
from tests.helpers import server_folder, wait_until

JOB = "job-x"


@pytest.fixture()
def stand_ins(tmp_path: Path):
    """Processes whose command lines are a POC client's and a job process's (``python -m <module> -m KIT``)."""
    modules = tmp_path / "modules"
    modules.mkdir()
    for name in ("client_train", "worker_process"):
        (modules / f"{name}.py").write_text("import time\ntime.sleep(60)\n")
    started = []

    def start(module: str, kit: Path, *more: str) -> None:
        command = [sys.executable, "-u", "-m", module, "-m", str(kit), "-s", "fed_client.json", *more]
        process = subprocess.Popen(command, cwd=modules, stdin=subprocess.DEVNULL)
        started.append(process)
        wait_until(lambda: _command_line(process.pid) == command, timeout=30, what=f"{module} of {kit.name} in /proc")

    yield start
    for process in started:
        process.kill()
        process.wait()


def _command_line(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]


def test_member_processes_reads_each_kits_client_and_job_processes(tmp_path: Path, stand_ins):
    kits = {name: tmp_path / "prod" / name for name in ("pharma-a", "pharma-b", "pharma-c")}
    stand_ins("client_train", kits["pharma-a"])
    stand_ins("worker_process", kits["pharma-a"], "-n", JOB, "-c", "pharma-a")
    stand_ins("client_train", kits["pharma-b"])  # restarted: a client, no job process
    stand_ins("client_train", tmp_path / "prod" / "pharma-bb")  # another kit whose name starts the same
    found = member_processes(kits)
    assert found == {
        "pharma-a": MemberProcesses(client=True, jobs={JOB}),
        "pharma-b": MemberProcesses(client=True, jobs=set()),
        "pharma-c": MemberProcesses(client=False, jobs=set()),
    }


@pytest.fixture()
def watch(tiny_consortium: Path, tmp_path: Path, monkeypatch):
    """A watch over job-x of a 2-member consortium (pharma-a, pharma-b), 3 rounds, with the processes
    it sees set by the test."""
    config = load_config(tiny_consortium)
    prod = tmp_path / "prod"
    seen: dict[str, MemberProcesses] = {}
    monkeypatch.setattr(poc_rejoin, "member_processes", lambda kits: {m: seen.get(m, MemberProcesses()) for m in kits})
    made = RejoinWatch(config, prod, job_id=JOB, rounds=3)
    made.seen = seen
    return made


def _server(watch: RejoinWatch, *, recorded: dict[str, int], stored: int | None) -> None:
    server_folder(watch.server_run.parent, rounds_recorded=recorded, stored_round=stored)


def test_a_member_back_without_its_job_process_is_seen_once_a_round_is_stored(watch: RejoinWatch):
    watch.seen["pharma-a"] = MemberProcesses(client=True, jobs={JOB})
    watch.seen["pharma-b"] = MemberProcesses(client=True, jobs={JOB})
    assert watch() is None  # both run the job
    watch.seen["pharma-b"] = MemberProcesses(client=False, jobs=set())  # killed
    assert watch() is None
    watch.seen["pharma-b"] = MemberProcesses(client=True, jobs=set())  # started again with its kit
    assert watch() is None  # the job stored no round yet: the continuation would not move the run on
    _server(watch, recorded={"pharma-a": 2, "pharma-b": 1}, stored=0)
    assert watch() == "pharma-b" and watch.member == "pharma-b"


def test_a_member_not_yet_deployed_or_done_with_the_job_is_not_taken_for_a_restart(watch: RejoinWatch):
    _server(watch, recorded={"pharma-a": 3, "pharma-b": 3}, stored=2)
    watch.seen["pharma-a"] = MemberProcesses(client=True, jobs=set())  # sent every round, its job process ended
    assert watch() is None
    watch.server_run.parent.joinpath(JOB).rename(watch.server_run.parent / "elsewhere")
    _server(watch, recorded={"pharma-a": 1}, stored=0)
    watch.in_job.clear()
    watch.seen["pharma-a"] = MemberProcesses(client=True, jobs={JOB})
    watch.seen["pharma-b"] = MemberProcesses(client=True, jobs=set())  # never ran this job (not deployed yet)
    assert watch() is None


def test_snapshot_keeps_the_stored_aggregate_and_the_records(watch: RejoinWatch, tmp_path: Path):
    _server(watch, recorded={"pharma-a": 2, "pharma-b": 1}, stored=1)
    kept = snapshot_job(watch.server_run, tmp_path / "kept")
    assert stored_round(kept) == 1
    assert {site: len(r) for site, r in read_records(kept).items()} == {"pharma-a": 2, "pharma-b": 1}
