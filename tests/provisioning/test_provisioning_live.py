"""Real provisioned kits on loopback: a server, two member sites and two leads' admin sessions.

Shows what the unit tests can only simulate: one member's lead cannot abort another member's job,
a site refuses to deploy a job whose meta scope its privacy.json does not define, and the scope's
result filter (jobs.site_policy.RequireEncryptedResult) stops a plaintext model at the site.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioning.kits import provision

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

SERVER_APP = {
    "format_version": 2,
    "components": [
        {"id": "persistor", "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor", "args": {}},
        {
            "id": "shareable_generator",
            "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
            "args": {},
        },
        {
            "id": "aggregator",
            "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator."
            "InTimeAccumulateWeightedAggregator",
            "args": {"expected_data_kind": "WEIGHTS"},
        },
    ],
    "workflows": [
        {
            "id": "scatter_and_gather",
            "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
            "args": {
                "min_clients": 1,
                "num_rounds": 1,
                "wait_time_after_min_received": 0,
                "aggregator_id": "aggregator",
                "persistor_id": "persistor",
                "shareable_generator_id": "shareable_generator",
                "train_task_name": "train",
                "train_timeout": 0,
            },
        }
    ],
}


def _client_app(sleep_time: int) -> dict:
    trainer = {"path": "nvflare.app_common.np.np_trainer.NPTrainer", "args": {"sleep_time": sleep_time}}
    return {"format_version": 2, "executors": [{"tasks": ["train"], "executor": trainer}]}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _write_job(folder: Path, *, name: str, scope: str, sites: list[str], sleep_time: int = 60) -> Path:
    (folder / "app/config").mkdir(parents=True)
    meta = {"name": name, "resource_spec": {}, "min_clients": 1, "deploy_map": {"app": ["server", *sites]}}
    meta["scope"] = scope
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "app/config/config_fed_server.json").write_text(json.dumps(SERVER_APP))
    (folder / "app/config/config_fed_client.json").write_text(json.dumps(_client_app(sleep_time)))
    return folder


def _start(kit: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a site from its own kit, as its operator would: ``startup/sub_start.sh`` (it runs ``python3``
    from PATH, so this interpreter's folder goes first)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    log = open(kit / "console.txt", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        ["bash", str(kit / "startup" / "sub_start.sh")],
        cwd=kit,
        env={**os.environ, "PATH": path, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: job processes die with it
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_job_processes(kits: Path) -> None:
    """Job processes (SJ/CJ) start in sessions of their own; find them by their kit path and end them."""
    marker = str(kits).encode()
    for _ in range(2):
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            return
        time.sleep(1)


def _wait(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_leads_and_scopes_on_a_live_system(tmp_path, make_config, operator_raw):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    fl_port, admin_port = _free_ports(2)
    config = make_config(operator={**operator_raw, "fl_port": fl_port, "admin_port": admin_port})
    kits = provision(config, out=tmp_path / "kits").out
    processes = [_start(kits / "localhost")]
    sessions = []
    try:
        time.sleep(3)
        for member in config.members:
            processes.append(_start(kits / member.name))
        lead_a = new_secure_session("lead@pharma-a.org", str(kits / "lead@pharma-a.org"), timeout=60)
        sessions.append(lead_a)
        lead_b = new_secure_session("boss@pharma-b.com", str(kits / "boss@pharma-b.com"), timeout=60)
        sessions.append(lead_b)
        _wait(lambda: len(lead_a.get_system_info().client_info) >= 2, timeout=90, what="both member sites to connect")

        job_a = lead_a.submit_job(
            str(_write_job(tmp_path / "job-a", name="a", scope="consortium-he", sites=["pharma-a"]))
        )
        with pytest.raises(Exception, match="user 'boss@pharma-b.com' is not authorized for 'abort_job'"):
            lead_b.abort_job(job_a)
        assert not lead_a.get_job_meta(job_a)["status"].startswith("FINISHED")
        lead_a.abort_job(job_a)  # its own org's job
        _wait(lambda: lead_a.get_job_meta(job_a)["status"] == "FINISHED:ABORTED", timeout=60, what="job a to abort")

        job_x = lead_b.submit_job(
            str(_write_job(tmp_path / "job-x", name="x", scope="no-such-scope", sites=["pharma-b"]))
        )
        refused = _wait(
            lambda: "privacy scope 'no-such-scope' is not allowed" in _logs(kits),
            timeout=120,
            what="pharma-b to refuse the job's scope",
        )
        assert refused
        status = _wait(
            lambda: (s := lead_b.get_job_meta(job_x)["status"]).startswith("FINISHED") and s,
            timeout=60,
            what="the refused job to finish",
        )
        assert status != "FINISHED:COMPLETED"
        # the submitter sees why (nvflare job meta): the refusing site and its reason
        detail = " ".join(lead_b.get_job_meta(job_x).get("job_deploy_detail") or [])
        assert "pharma-b" in detail and "privacy scope 'no-such-scope' is not allowed" in detail, detail

        plain = _write_job(tmp_path / "job-p", name="p", scope="consortium-he", sites=["pharma-a"], sleep_time=0)
        lead_a.submit_job(str(plain))
        _wait(
            lambda: "RequireEncryptedResult: this job would send a plaintext model" in _logs(kits),
            timeout=120,
            what="pharma-a's scope filter to stop the plaintext result",
        )
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):  # the system may already be down
                session.close()
        for process in reversed(processes):
            _stop(process)
        _stop_job_processes(kits)


def _logs(kits: Path) -> str:
    text = []
    for path in kits.rglob("*.txt"):
        try:
            text.append(path.read_text(errors="replace"))
        except OSError:
            continue
    return "\n".join(text)
