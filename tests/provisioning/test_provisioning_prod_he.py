"""The encrypted federated job on real provisioned startup kits (not POC), as a deployment runs it.

The operator provisions kits from consortium.yaml, the members' key custodian runs the key ceremony,
a server and two member sites start from their kits on loopback, and a member lead submits the HE
recipe through ``ProdEnv`` with its own admin kit. The server only ever holds ciphertext.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_provisioning_live import _free_ports, _start, _stop, _stop_job_processes, _wait

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2


def _cli(*argv: str) -> None:
    from consortium.cli import main

    assert main(list(argv)) == 0, f"consortium {' '.join(argv)} failed"


def _tail(kits: Path) -> str:
    parts = []
    for path in sorted(kits.rglob("*.txt")) + sorted(kits.rglob("log.txt")):
        with contextlib.suppress(OSError):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)[-20000:]


def test_he_job_on_provisioned_kits(tmp_path):
    from nvflare.recipe import ProdEnv

    from consortium.commands.synth import synthesize
    from jobs.biomarker_mtl.job import build_recipe, server_model
    from jobs.he.store import decrypt_aggregate_file
    from models.network import SharedTrunk
    from schema.config import load_config

    cfg = synthesize(tmp_path / "c", sizes=[120, 150], n_features=150, seed=1, rounds=ROUNDS)
    raw = yaml.safe_load(cfg.read_text())
    fl_port, admin_port = _free_ports(2)
    raw["operator"] = {**raw["operator"], "fl_port": fl_port, "admin_port": admin_port}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(cfg)

    kits, keys, outputs = tmp_path / "kits", tmp_path / "keys", tmp_path / "site-outputs"
    _cli("provision", "--config", str(cfg), "--out", str(kits))
    _cli("keys", "create", "--config", str(cfg), "--out", str(keys))
    _cli("keys", "install", "--config", str(cfg), "--kits", str(kits), "--keys", str(keys))
    _cli("keys", "verify", "--config", str(cfg), "--kits", str(kits))

    server_kit = kits / config.operator.host
    assert not list(server_kit.rglob("client_context.tenseal")), "the server kit must hold no secret key"

    processes = [
        _start(
            server_kit,
            "nvflare.private.fed.app.server.server_train",
            "fed_server.json",
            [f"org={config.operator.org}"],
            {},
        )
    ]
    lead = config.members[0]
    env = None
    try:
        time.sleep(3)
        site_env = {"CONSORTIUM_CONFIG": str(cfg), "CONSORTIUM_SITE_OUTPUTS": str(outputs)}
        for member in config.members:
            processes.append(
                _start(
                    kits / member.name,
                    "nvflare.private.fed.app.client.client_train",
                    "fed_client.json",
                    [f"uid={member.name}", f"org={member.org}"],
                    site_env,
                )
            )
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        session = new_secure_session(lead.admin, str(kits / lead.admin), timeout=60)
        try:
            _wait(
                lambda: len(session.get_system_info().client_info) >= len(config.members),
                timeout=90,
                what="both member sites to connect",
            )
        finally:
            session.close()

        recipe = build_recipe(config, config_path=None, outputs=None, rounds=ROUNDS, he=True)
        env = ProdEnv(startup_kit_location=str(kits / lead.admin), username=lead.admin, login_timeout=30)
        run = recipe.execute(env)
        result = run.get_result(timeout=240, clean_up=False)
        status = run.get_status()
        assert status and "COMPLETED" in status, f"job status {status!r}\n{_tail(kits)}"
        assert result, f"no result\n{_tail(kits)}"

        for member in config.members:
            metrics = outputs / member.name / "metrics.jsonl"
            assert metrics.is_file(), f"{metrics} missing\n{_tail(kits)}"
            rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip()]
            assert rounds == list(range(ROUNDS)), rounds

        result = Path(result)
        for folder in (result, server_kit):
            assert not list(folder.rglob("FL_global_model.pt")), "the server must never store a plaintext trunk"
        stored = list(result.rglob("FL_global_model.ckks"))
        assert len(stored) == 1, list(result.rglob("*"))
        trunk = decrypt_aggregate_file(stored[0], client_context=(keys / "client_context.tenseal").read_bytes())
        expected = set(SharedTrunk(**server_model(config)["args"]).state_dict())
        assert set(trunk) == expected
        assert all(np.isfinite(np.asarray(value)).all() for value in trunk.values())
        assert not list(server_kit.rglob("client_context.tenseal"))
    finally:
        for process in reversed(processes):
            _stop(process)
        _stop_job_processes(kits)
