"""Faults on a real POC system: a member restarted mid-run, a forged certificate, a dead server, a site
that does not come up. One system start covers the first three (they happen in this order in one run)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from consortium.backends import poc_system as flare_poc
from consortium.backends.poc_system import check_ports_free, poc_system
from consortium.cli import main
from consortium.flare_env import FederatedRunError
from consortium.processes import stop_processes_under
from consortium.results import read_records
from consortium.run_state import STATE_FILE, RunState
from jobs.tls_refusals import REFUSAL_MESSAGE
from schema.config import load_config
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE
from tests.certificates import certificate
from tests.helpers import console_script, poc_kit, relocated_config, updates_received, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.fault]

FL_PORT, ADMIN_PORT = 8122, 8123  # apart from the other POC tests' ports


def _config(tiny_consortium: Path, tmp_path: Path, **training) -> Path:
    operator = {"fl_port": FL_PORT, "admin_port": ADMIN_PORT}
    return relocated_config(tiny_consortium, tmp_path, training=training, operator=operator)


def _jobs(flare: Path) -> list[Path]:
    """The server's running job folders that recorded a result, oldest first (FLARE moves a job's folder
    into its job store when the job ends, so a folder may go while it is looked at)."""
    found = []
    for server in [k for k in flare.rglob("localhost") if (k / "startup").is_dir()]:
        for path in server.rglob(PUBLISHED_FILE):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime, path.parent))
    return [folder for _, folder in sorted(found)]


def _job_id(flare: Path, job_folder: Path) -> str:
    """The job id of a server job folder (``<server kit>/<job id>/...``)."""
    return job_folder.relative_to(poc_kit(flare, "localhost")).parts[0]


def _kept_job_ids(out: Path, key: str, *, finished: bool) -> set[str]:
    """The job ids of the run's job ``key`` once it finished (``finished``), from its run_state.json."""
    state = RunState.load(out) if (out / STATE_FILE).exists() else None
    parts = state.jobs.get(key, []) if state else []
    if finished and not (parts and state.finished(key)):
        return set()
    return {p.job_id for p in parts}


def _wait_for(condition, stop: threading.Event) -> bool:
    """Whether ``condition`` came true before the run ended (``stop``)."""
    return bool(wait_until(condition, timeout=900, interval=0.5, what="the fault's moment", stop=stop))


def _server_answers(root_ca: Path, cert: Path, key: Path) -> bytes:
    """What the FLARE server's port answers a TLS client holding ``cert`` (b'' when it refuses)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", FL_PORT), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return tls.recv(64)
    except (ssl.SSLError, ConnectionError):
        return b""


def _restart(kit: Path) -> None:
    """Start a member again the way its operator would: the kit's own start script."""
    # the kit's scripts start `python3` from PATH: this interpreter, as `nvflare poc start` does
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    subprocess.Popen(
        ["bash", str(kit / "startup" / "start.sh")],
        cwd=kit,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_restarted_member_forged_certificate_dead_server_and_resume(tiny_consortium: Path, tmp_path: Path, capsys):
    """fold 0: pharma-b is killed after round 0 and restarted with its start script: the command sees it
    back, ends the job after its stored round 0 and continues at round 1 with every member. Meanwhile a
    self-signed 'pharma-b' certificate is refused, and the server logs the refusal. Then the server dies
    after fold 1's round 0: the command ends with the cause, the server's log and the way on, and leaves
    no process and no port behind. ``--resume`` then runs fold 1's last round only and reports the run."""
    config = _config(tiny_consortium, tmp_path, rounds=2, min_members=1, round_deadline=60)
    out = tmp_path / "run"
    flare = out / "flare"
    stop, seen = threading.Event(), {}

    def faults() -> None:
        rounds_of = updates_received  # 0 while the job's folder moves (FLARE stores an ended job elsewhere)
        if not _wait_for(lambda: _jobs(flare) and rounds_of(_jobs(flare)[0], "pharma-b") >= 1, stop):
            return
        first_job, member = _jobs(flare)[0], poc_kit(flare, "pharma-b")
        stop_processes_under(member)
        seen["member_killed"] = time.monotonic()
        _restart(member)
        root_ca = member / "startup" / "rootCA.pem"
        (tmp_path / "forged").mkdir()
        certificate("pharma-b", tmp_path / "forged")  # what a forger can make: signed by no consortium CA
        forged = (tmp_path / "forged" / "pharma-b.crt", tmp_path / "forged" / "pharma-b.key")
        seen["forging"] = time.monotonic()
        seen["forged_answer"] = _server_answers(root_ca, *forged)
        seen["forged_refused"] = time.monotonic()
        genuine = poc_kit(flare, "pharma-a") / "startup"
        seen["genuine_answer"] = _server_answers(root_ca, genuine / "client.crt", genuine / "client.key")
        # pharma-b back in fold 0 itself: a later job (the continuation) with its round-1 update
        later = lambda: [j for j in _jobs(flare) if j != first_job and rounds_of(j, "pharma-b") >= 1]  # noqa: E731
        if not _wait_for(later, stop):
            return
        seen["rejoined"] = time.monotonic()
        # the server dies once fold 1 (a job that none of fold 0's parts ran) stored its round-0 aggregate
        fold0_jobs = lambda: _kept_job_ids(out, "seed0-fold0", finished=True)  # noqa: E731
        fold1 = lambda: [j for j in _jobs(flare) if fold0_jobs() and _job_id(flare, j) not in fold0_jobs()]  # noqa: E731
        stored = lambda: fold1() and list(fold1()[0].rglob(GLOBAL_MODEL_FILE))  # noqa: E731
        if not _wait_for(lambda: stored() and rounds_of(fold1()[0], "pharma-b") >= 1, stop):
            return
        stop_processes_under(poc_kit(flare, "localhost"))
        seen["server_killed"] = time.monotonic()

    def faults_seen() -> None:
        try:
            faults()
        except BaseException as exc:  # seen by the test, not lost with the thread
            seen["error"] = exc

    chaos = threading.Thread(target=faults_seen, daemon=True)
    chaos.start()
    try:
        # the console script in its own process, as a user runs it: its exit (not only its return) is tested
        killed = console_script(
            ["run", "--config", str(config), "--env", "poc", "--no-he", "--folds", "2", "--out", str(out)], timeout=900
        )
        code = killed.returncode
    except BaseException:  # a command that did not end (or a test past its timeout) leaves no FLARE process
        stop_processes_under(flare)
        raise
    finally:
        ended = time.monotonic()
        stop.set()
        chaos.join(timeout=30)
    if "error" in seen:
        raise seen["error"]
    err, said = " ".join(killed.stderr.split()), " ".join(killed.stdout.split())
    assert "server_killed" in seen, f"the run ended before the server was killed (exit {code}): {said} {err}"
    server_log = (poc_kit(flare, "localhost") / "log.txt").read_text()
    with capsys.disabled():
        print(
            "\nfault timings: member killed -> its update in the continuing job"
            f" {seen['rejoined'] - seen['member_killed']:.1f} s;"
            f" forged certificate -> refused {seen['forged_refused'] - seen['forging']:.2f} s;"
            f" server killed -> command ended {ended - seen['server_killed']:.1f} s; it said: {err[:400]}"
        )
    assert seen["forged_answer"] == b""  # the TLS handshake is refused: not one byte of FLARE's protocol
    assert seen["genuine_answer"] != b""  # while a member's real certificate gets an answer on the same port
    refusals = [line for line in server_log.splitlines() if REFUSAL_MESSAGE in line]
    assert len(refusals) == 1 and "certificate verify failed" in refusals[0], refusals  # logged, once
    assert "pharma-b is back: job" in said and "continuing at round 1 with every member" in said
    fold0 = read_records(out / "jobs" / "seed0-fold0")
    assert {site: [r["round"] for r in records] for site, records in fold0.items()} == {
        "pharma-a": [0, 1],
        "pharma-b": [0, 1],  # it missed no round: the round it was killed in was run again with it
    }
    assert code == 1
    assert "the FLARE server 'localhost' stopped while job" in err and "log.txt" in err
    assert "run the same command with --resume to continue at round 1" in err
    assert ended - seen["server_killed"] < 60  # the process itself ends: the issue saw it wait forever
    assert stop_processes_under(flare) == 0
    check_ports_free(load_config(config))  # raises if the dead server's clients or job processes hold a port

    resumed = time.monotonic()
    args = ["run", "--config", str(config), "--env", "poc", "--no-he", "--folds", "2", "--out", str(out), "--json"]
    again = console_script([*args, "--resume"], timeout=900)
    with capsys.disabled():
        print(f"resume after the server restart: {time.monotonic() - resumed:.1f} s (one POC start, one round)")
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)["report"]
    # fold 0: chained when pharma-b came back; fold 1: after the server's restart. Fold 0 is read back
    assert {key: [p["rounds"] for p in parts] for key, parts in report["continued"].items()} == {
        "seed0-fold0": [[0, 0], [1, 1]],
        "seed0-fold1": [[0, 0], [1, 1]],  # the stored round is not run again
    }
    assert report["rounds"] and all(len(r) == 2 for r in read_records(out / "jobs" / "seed0-fold1").values())
    assert set(report["members"]) == {"pharma-a", "pharma-b"}
    entries = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    interrupted = [e["details"] for e in entries if e["event"] == "job_interrupted"]
    assert [e.get("reason") for e in interrupted] == ["member_rejoined", None]
    assert interrupted[0]["member"] == "pharma-b" and entries[-1]["event"] == "model_released"
    assert main(["audit", "verify", str(out / "audit.jsonl")]) == 0
    assert stop_processes_under(flare) == 0


def test_a_member_that_cannot_start_is_named_with_its_log(tiny_consortium: Path, tmp_path: Path, monkeypatch):
    config = load_config(_config(tiny_consortium, tmp_path))
    write_site_policies = flare_poc.write_site_policies

    def break_pharma_b(folder: Path, **kwargs) -> None:
        write_site_policies(folder, **kwargs)
        if folder.name == "pharma-b":
            (folder / "startup" / "client.key").unlink()  # its client cannot prove who it is, so never starts

    monkeypatch.setattr(flare_poc, "write_site_policies", break_pharma_b)
    with (
        pytest.raises(FederatedRunError) as failure,
        poc_system(config, tmp_path / "flare", keys=None, start_timeout=30),
    ):
        pass
    message = str(failure.value)
    assert "POC start failed" in message
    assert "member 'pharma-b' did not register with the server; its log: " in message
    assert "member 'pharma-a'" not in message
    assert stop_processes_under(tmp_path / "flare") == 0
