"""The encrypted federated job on real provisioned startup kits (not POC), as a deployment runs it.

The operator provisions kits from consortium.yaml, the members' key custodian runs the key ceremony,
a server and two member sites start from their own kits' ``startup/sub_start.sh`` on loopback, each
site in its own workspace (no shared outputs folder), and a member lead submits the exported HE job
(no custom code: leads have no ``byoc`` right; the sites run the installed ``jobs`` package) with its
own admin kit. The
server only ever holds ciphertext, in a job store inside its own workspace. ``nvflare preflight-check``
passes for every kit. Afterwards the key custodian releases it with ``consortium release --job ID --kit
LEAD_KIT --keys KEYS``: the report from what the server received, the model registered in MLflow and
scoring a member's raw file, the audit log chained, and the researcher's notebook opens the released job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
import yaml

from consortium.audit import verify_log
from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from jobs.recipe import export_job
from jobs.store import read_aggregate
from omics.io import read_member
from schema.config import load_config
from tests.helpers import free_ports, listening, start_site, stop_job_processes, stop_site, wait_until

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore_results.ipynb"

ROUNDS = 2


def _cli(*argv: str) -> None:
    assert cli(list(argv)) == 0, f"consortium {' '.join(argv)} failed"


def _tail(kits: Path) -> str:
    parts = []
    for path in sorted(kits.rglob("*.txt")) + sorted(kits.rglob("log.txt")):
        with contextlib.suppress(OSError):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)[-20000:]


def _preflight(*kits: Path) -> None:
    """``nvflare preflight-check -p KIT`` for each kit, side by side; every one must pass."""
    nvflare = str(Path(sys.executable).parent / "nvflare")
    # its dry runs start the kit's scripts, which run ``python3`` from PATH: this interpreter's folder first
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    checks = {
        kit: subprocess.Popen(
            [nvflare, "preflight-check", "-p", str(kit)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for kit in kits
    }
    for kit, check in checks.items():
        output = check.communicate(timeout=180)[0].decode(errors="replace")
        assert check.returncode == 0 and "overall: pass" in output, f"preflight-check -p {kit}:\n{output[-3000:]}"


def test_he_job_on_provisioned_kits_and_its_release(tmp_path):
    import mlflow
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    cfg = synthesize(tmp_path / "c", sizes=[120, 150], n_features=150, seed=1, rounds=ROUNDS)
    raw = yaml.safe_load(cfg.read_text())
    fl_port, admin_port = free_ports(2)
    raw["operator"] = {**raw["operator"], "fl_port": fl_port, "admin_port": admin_port}
    # a shared endpoint: both members' survival outcome is one consortium endpoint
    for member in raw["members"]:
        for task in member["tasks"]:
            if task["type"] == "survival":
                task["name"] = "pfs"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(cfg)

    kits, keys = tmp_path / "kits", tmp_path / "keys"
    _cli("provision", "--config", str(cfg), "--out", str(kits))
    _cli("keys", "create", "--config", str(cfg), "--out", str(keys))
    _cli("keys", "install", "--config", str(cfg), "--kits", str(kits), "--keys", str(keys))
    _cli("keys", "verify", "--config", str(cfg), "--kits", str(kits))

    server_kit = kits / config.operator.host
    assert not list(server_kit.rglob("client_context.tenseal")), "the server kit must hold no secret key"

    _preflight(server_kit)  # before it starts: its ports must be free
    processes = [start_site(server_kit)]
    lead, other = config.members
    try:
        wait_until(lambda: listening(fl_port) and listening(admin_port), timeout=90, what="the server to listen")
        admins = [kits / config.operator.admin, *(kits / m.admin for m in config.members)]
        _preflight(*(kits / m.name for m in config.members), *admins)  # they reach the server
        for member in config.members:
            processes.append(start_site(kits / member.name, env={"CONSORTIUM_CONFIG": str(cfg)}))
        session = new_secure_session(lead.admin, str(kits / lead.admin), timeout=60)
        try:
            wait_until(
                lambda: len(session.get_system_info().client_info) >= len(config.members),
                timeout=90,
                interval=1,
                what="both member sites to connect",
            )
        finally:
            session.close()

        job_folder = export_job(config, tmp_path / "export", he=True, rounds=ROUNDS)  # names no path, no code
        session = new_secure_session(lead.admin, str(kits / lead.admin), timeout=60)
        rival = new_secure_session(other.admin, str(kits / other.admin), timeout=60)
        try:
            with_code = shutil.copytree(job_folder, tmp_path / "with-code" / job_folder.name)
            (with_code / "app" / "custom").mkdir()
            (with_code / "app" / "custom" / "extra.py").write_text("x = 1\n")
            refused = session.submit_job(str(with_code))  # leads may not ship code: no site deploys it
            job_id = session.submit_job(str(job_folder))
            meta = session.wait_for_job(job_id, timeout=300)
            assert "COMPLETED" in meta["status"], f"job status {meta['status']!r}\n{_tail(kits)}"
            refusal = session.wait_for_job(refused, timeout=120)
            assert refusal["status"] != "FINISHED:COMPLETED" and "BYOC not permitted" in str(
                refusal.get("job_deploy_detail")
            ), refusal
            assert session.get_job_logs(job_id)["logs"]["server"]  # nvflare job logs: its own org's job
            with pytest.raises(Exception, match="not authorized"):
                rival.get_job_logs(job_id)
        finally:
            session.close()
            rival.close()
        # the job store lies in the operator's workspace, not in /tmp/nvflare
        assert (server_kit / "jobs-storage" / job_id).exists()
        for member in config.members:  # each site kept its private outputs in its own workspace
            assert list((kits / member.name).rglob("predictions.npz")), _tail(kits)

        out = tmp_path / "release"
        _cli(
            "release",
            "--config",
            str(cfg),
            "--job",
            job_id,
            "--kit",
            str(kits / lead.admin),
            "--out",
            str(out),
            "--keys",
            str(keys),
        )
        result = kits / lead.admin / "transfer" / job_id  # what the release downloaded with the lead's kit
        for folder in (result, server_kit):
            assert not list(folder.rglob("FL_global_model.pt")), "the server must never store a plaintext model"
        [stored] = list(result.rglob("FL_global_model.sections"))
        assert read_aggregate(stored).encrypted is not None

        report = json.loads((out / "report.json").read_text())
        assert report["job_id"] == job_id and report["privacy"]["he"] is True
        assert report["endpoints"]["pfs"]["shared"] is True and report["endpoints"]["pfs"]["members"] == [
            m.name for m in config.members
        ]
        for member in config.members:
            tasks = report["members"][member.name]["tasks"]
            assert all(0.0 <= t["federated"] <= 1.0 or t["metric"] == "r2" for t in tasks.values())
            assert all(t["ci"]["federated"] is not None for t in tasks.values())
        assert len(report["rounds"]) == ROUNDS
        assert report["biomarkers"]["statistics"]["pfs"][0]["members"] == 2
        assert report["biomarkers"]["model"]["pfs"]

        # the registered model scores a member's raw file: one column per shared endpoint
        mlflow.set_tracking_uri(report["tracking"]["uri"])
        assert report["tracking"]["registered_model"] == f"models:/{config.name}/1"
        model = mlflow.pyfunc.load_model(report["tracking"]["registered_model"])
        adata = read_member(lead.data)
        scores = model.predict(adata[:, config.panel_features()].to_df())
        assert list(scores.columns) == ["pfs"] and len(scores) == adata.n_obs

        # the audit log: who submitted, every round, the release; NVFlare's own job audit chained in
        assert verify_log(out / "audit.jsonl").ok
        entries = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
        assert [e["event"] for e in entries] == ["job_submitted", *["round_completed"] * ROUNDS, "model_released"]
        assert entries[0]["details"]["submitter"] == lead.admin
        assert len(entries[0]["details"]["server_audit_sha256"]) == 64

        # the researcher's notebook opens the released job (no member's predictions here: it says so)
        executed = papermill.execute_notebook(
            str(NOTEBOOK),
            str(tmp_path / "explore_release.ipynb"),
            parameters=dict(run_dir=str(out), top_features=5),
            cwd=str(NOTEBOOK.parent),
            kernel_name="python3",
            progress_bar=False,
        )
        outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4  # metrics, curves, volcano, effects
    finally:
        for process in reversed(processes):
            stop_site(process)
        stop_job_processes(kits)
