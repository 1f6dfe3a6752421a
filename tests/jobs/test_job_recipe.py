"""The job's recipe and its exported folder (no FLARE processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.pt.recipes import FedAvgRecipe

from jobs.biomarker_mtl import job
from jobs.runner import poc_project, run_federated
from schema.config import load_config

ROOT = Path(job.__file__).resolve().parents[2]


def _exported(folder: Path) -> tuple[dict, dict, dict]:
    app = folder / "app" / "config"
    return (
        json.loads((app / "config_fed_server.json").read_text()),
        json.loads((app / "config_fed_client.json").read_text()),
        json.loads((folder / "meta.json").read_text()),
    )


def _component(config: dict, component_id: str) -> dict:
    return next(c for c in config["components"] if c["id"] == component_id)


def test_recipe_holds_the_trunk_paths_only_and_mlflow(tiny_consortium: Path, tmp_path: Path) -> None:
    config = load_config(tiny_consortium)
    recipe = job.build_recipe(config, config_path=tiny_consortium, outputs=tmp_path / "sites", rounds=3,
                              tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    assert isinstance(recipe, FedAvgRecipe)
    recipe.export(str(tmp_path / "export"))
    server, client, meta = _exported(tmp_path / "export" / recipe.name)

    assert meta["min_clients"] == 2 and JobMetaKey.SCOPE.value not in meta
    controller = server["workflows"][0]["args"]
    assert controller["num_rounds"] == 3
    persistor = _component(server, "persistor")["args"]["model"]
    assert persistor["path"] == "models.network.SharedTrunk"
    training = config.training
    assert persistor["args"] == {"n_features": len(config.panel_features()), "trunk_widths": training.trunk_widths,
                                 "dropout": training.dropout, "seed": training.seed}

    receiver = _component(server, "receiver")["args"]
    assert receiver["tracking_uri"] == "sqlite:///" + str(tmp_path / "mlflow.db")
    assert receiver["kw_args"]["experiment_name"] == config.tracking.experiment
    assert receiver["kw_args"]["run_tags"] == {"consortium": config.name, "he": "off", "dp": "off"}

    executor = client["executors"][0]["executor"]["args"]
    # only paths travel as arguments; every hyper-parameter comes from consortium.yaml
    assert executor["task_script_args"] == f"--config {tiny_consortium.resolve()} --outputs {tmp_path / 'sites'}"


def test_export_names_no_local_path(tiny_consortium: Path, tmp_path: Path) -> None:
    config = load_config(tiny_consortium)
    folder = job.export_job(config, tmp_path / "export")
    _, client, _ = _exported(folder)
    executor = client["executors"][0]["executor"]["args"]
    assert not executor.get("task_script_args")  # sites read CONSORTIUM_CONFIG
    script = executor["task_script_path"]
    assert not Path(script).is_absolute()
    assert (folder / "app" / "custom" / script).read_bytes() == job.CLIENT_SCRIPT.read_bytes()


def test_job_script_exports_like_hello_pt(tiny_consortium: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(job.CLIENT_SCRIPT.with_name("job.py")), "--config", str(tiny_consortium),
         "--export", "--export-dir", str(tmp_path / "exported")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "exported" / "synthetic-consortium-biomarker-mtl"
    assert (folder / "meta.json").exists() and "nvflare job submit -j" in done.stdout


def test_he_recipe_comes_from_the_he_job_with_the_privacy_scope(tiny_consortium: Path, tmp_path: Path) -> None:
    pytest.importorskip("jobs.he.recipe")
    config = load_config(tiny_consortium)
    recipe = job.build_recipe(config, config_path=tiny_consortium, outputs=tmp_path, he=True)
    assert not isinstance(recipe, FedAvgRecipe)
    recipe.export(str(tmp_path / "export"))
    server, client, meta = _exported(tmp_path / "export" / recipe.name)
    assert meta[JobMetaKey.SCOPE.value] == job.HE_SCOPE
    assert _component(server, "receiver")["args"]["kw_args"]["run_tags"]["he"] == "on"
    args = next(e for e in client["executors"])["executor"]["args"]
    assert args["task_script_path"] == str(job.CLIENT_SCRIPT)  # the same client script as plaintext


def test_he_without_the_he_job_says_so(tiny_consortium: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job, "HE_RECIPE_MODULE", "jobs.he.not_installed")
    config = load_config(tiny_consortium)
    with pytest.raises(NotImplementedError, match=r"jobs\.he\.not_installed\.build_he_recipe"):
        job.build_recipe(config, config_path=None, outputs=None, he=True)


def test_he_refuses_the_simulator(tiny_consortium: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="env='poc'"):
        run_federated(load_config(tiny_consortium), env="sim", out=tmp_path, he=True)


def test_paths_with_spaces_are_refused(tiny_consortium: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        job.build_recipe(load_config(tiny_consortium), config_path=tiny_consortium, outputs=tmp_path / "a b")


def test_poc_project_uses_the_operator_ports_and_members(tiny_consortium: Path) -> None:
    config = load_config(tiny_consortium)
    project = poc_project(config)
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert (server["fed_learn_port"], server["admin_port"]) == (config.operator.fl_port, config.operator.admin_port)
    clients = [p for p in project["participants"] if p["type"] == "client"]
    assert [c["name"] for c in clients] == ["pharma-a", "pharma-b"]
    assert all(c["org"].replace("_", "").isalnum() for c in clients)  # FLARE's org names: [A-Za-z0-9_]
    assert not any("HEBuilder" in b["path"] for b in project["builders"])  # the operator makes no HE keys
