"""The encrypted federated job on real provisioned startup kits (not POC), as a deployment runs it.

The operator provisions kits from consortium.yaml, the members' key custodian runs the key ceremony,
a server and two member sites start from their own kits' ``startup/sub_start.sh`` on loopback, each
site in its own workspace (no shared outputs folder), and a member lead submits the HE job through
``ProdEnv`` with its own admin kit. The server only ever holds ciphertext. Afterwards the lead builds
the report with ``consortium report --job ID --kit LEAD_KIT``: from what the server received, and the
custodian's secret context to open the aggregate.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import yaml
from test_provisioning_live import _free_ports, _start, _stop, _stop_job_processes, _wait

from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from jobs.recipe import build_recipe
from jobs.store import read_aggregate
from schema.config import load_config

pytestmark = pytest.mark.slow

ROUNDS = 2


def _cli(*argv: str) -> None:
    assert cli(list(argv)) == 0, f"consortium {' '.join(argv)} failed"


def _tail(kits: Path) -> str:
    parts = []
    for path in sorted(kits.rglob("*.txt")) + sorted(kits.rglob("log.txt")):
        with contextlib.suppress(OSError):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)[-20000:]


def test_he_job_on_provisioned_kits_and_its_report(tmp_path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session
    from nvflare.recipe import ProdEnv

    cfg = synthesize(tmp_path / "c", sizes=[120, 150], n_features=150, seed=1, rounds=ROUNDS)
    raw = yaml.safe_load(cfg.read_text())
    fl_port, admin_port = _free_ports(2)
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

    processes = [_start(server_kit)]
    lead = config.members[0]
    try:
        time.sleep(3)
        for member in config.members:
            processes.append(_start(kits / member.name, {"CONSORTIUM_CONFIG": str(cfg)}))
        session = new_secure_session(lead.admin, str(kits / lead.admin), timeout=60)
        try:
            _wait(
                lambda: len(session.get_system_info().client_info) >= len(config.members),
                timeout=90,
                what="both member sites to connect",
            )
        finally:
            session.close()

        recipe = build_recipe(config, he=True, rounds=ROUNDS)  # names no path: sites use CONSORTIUM_CONFIG
        run = recipe.execute(
            ProdEnv(startup_kit_location=str(kits / lead.admin), username=lead.admin, login_timeout=30)
        )
        result = run.get_result(timeout=300)
        status = run.get_status()
        assert status and "COMPLETED" in status, f"job status {status!r}\n{_tail(kits)}"
        job_id = run.get_job_id()

        for folder in (Path(result), server_kit):
            assert not list(folder.rglob("FL_global_model.pt")), "the server must never store a plaintext model"
        [stored] = list(Path(result).rglob("FL_global_model.sections"))
        assert read_aggregate(stored).encrypted is not None
        for member in config.members:  # each site kept its private outputs in its own workspace
            assert list((kits / member.name).rglob("predictions.npz")), _tail(kits)

        out = tmp_path / "report"
        _cli(
            "report",
            "--config",
            str(cfg),
            "--job",
            job_id,
            "--kit",
            str(kits / lead.admin),
            "--out",
            str(out),
            "--client-context",
            str(keys / "client_context.tenseal"),
        )
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
    finally:
        for process in reversed(processes):
            _stop(process)
        _stop_job_processes(kits)
