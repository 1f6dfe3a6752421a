"""Real provisioned kits on loopback: a server, two member sites and two leads' admin sessions.

Shows what the unit tests can only simulate: one member's lead cannot abort another member's job,
a site refuses to deploy a job whose meta scope its privacy.json does not define, and the scope's
result filter (jobs.site_policy.RequireEncryptedResult) stops a plaintext model at the site.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from provisioning.kits import provision
from tests.helpers import free_ports, listening, start_site, stop_job_processes, stop_site, wait_until

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


def _write_job(folder: Path, *, name: str, scope: str, sites: list[str], sleep_time: int = 60) -> Path:
    (folder / "app/config").mkdir(parents=True)
    meta = {"name": name, "resource_spec": {}, "min_clients": 1, "deploy_map": {"app": ["server", *sites]}}
    meta["scope"] = scope
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "app/config/config_fed_server.json").write_text(json.dumps(SERVER_APP))
    (folder / "app/config/config_fed_client.json").write_text(json.dumps(_client_app(sleep_time)))
    return folder


def test_leads_and_scopes_on_a_live_system(tmp_path, make_config, operator_raw):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    fl_port, admin_port = free_ports(2)
    config = make_config(operator={**operator_raw, "fl_port": fl_port, "admin_port": admin_port})
    kits = provision(config, out=tmp_path / "kits").out
    processes = [start_site(kits / "localhost")]
    sessions = []
    try:
        wait_until(lambda: listening(fl_port) and listening(admin_port), timeout=90, what="the server to listen")
        for member in config.members:
            processes.append(start_site(kits / member.name))
        lead_a = new_secure_session("lead@pharma-a.org", str(kits / "lead@pharma-a.org"), timeout=60)
        sessions.append(lead_a)
        lead_b = new_secure_session("boss@pharma-b.com", str(kits / "boss@pharma-b.com"), timeout=60)
        sessions.append(lead_b)
        wait_until(
            lambda: len(lead_a.get_system_info().client_info) >= 2,
            timeout=90,
            interval=1,
            what="both member sites to connect",
        )

        job_a = lead_a.submit_job(
            str(_write_job(tmp_path / "job-a", name="a", scope="consortium-he", sites=["pharma-a"]))
        )
        with pytest.raises(Exception, match="user 'boss@pharma-b.com' is not authorized for 'abort_job'"):
            lead_b.abort_job(job_a)
        assert not lead_a.get_job_meta(job_a)["status"].startswith("FINISHED")
        lead_a.abort_job(job_a)  # its own org's job
        wait_until(
            lambda: lead_a.get_job_meta(job_a)["status"] == "FINISHED:ABORTED",
            timeout=60,
            interval=1,
            what="job a to abort",
        )

        job_x = lead_b.submit_job(
            str(_write_job(tmp_path / "job-x", name="x", scope="no-such-scope", sites=["pharma-b"]))
        )
        refused = wait_until(
            lambda: "privacy scope 'no-such-scope' is not allowed" in _logs(kits),
            timeout=120,
            interval=1,
            what="pharma-b to refuse the job's scope",
        )
        assert refused
        status = wait_until(
            lambda: (s := lead_b.get_job_meta(job_x)["status"]).startswith("FINISHED") and s,
            timeout=60,
            interval=1,
            what="the refused job to finish",
        )
        assert status != "FINISHED:COMPLETED"
        # the submitter sees why (nvflare job meta): the refusing site and its reason
        detail = " ".join(lead_b.get_job_meta(job_x).get("job_deploy_detail") or [])
        assert "pharma-b" in detail and "privacy scope 'no-such-scope' is not allowed" in detail, detail

        plain = _write_job(tmp_path / "job-p", name="p", scope="consortium-he", sites=["pharma-a"], sleep_time=0)
        lead_a.submit_job(str(plain))
        wait_until(
            lambda: "RequireEncryptedResult: this job would send a plaintext model" in _logs(kits),
            timeout=120,
            interval=1,
            what="pharma-a's scope filter to stop the plaintext result",
        )
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):  # the system may already be down
                session.close()
        for process in reversed(processes):
            stop_site(process)
        stop_job_processes(kits)


def _logs(kits: Path) -> str:
    text = []
    for path in kits.rglob("*.txt"):
        try:
            text.append(path.read_text(errors="replace"))
        except OSError:
            continue
    return "\n".join(text)
