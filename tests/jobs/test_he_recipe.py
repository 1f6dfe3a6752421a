"""The HE job as exported: the HE components are wired, the sites' scope is set, SimEnv is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.recipe import SimEnv

from jobs.he.recipe import HEFedAvgRecipe, build_he_recipe
from schema.config import load_config


@pytest.fixture(scope="module")
def exported(tiny_consortium: Path, tmp_path_factory) -> dict[str, dict]:
    config = load_config(tiny_consortium)
    out = tmp_path_factory.mktemp("he_export")
    recipe = build_he_recipe(config, config_path=tiny_consortium, outputs=out / "sites", rounds=2)
    assert isinstance(recipe, HEFedAvgRecipe)
    recipe.export(str(out / "job"))
    return {p.name: json.loads(p.read_text()) for p in (out / "job").rglob("*.json")}


def _paths(section: list[dict]) -> list[str]:
    return [c["path"] for c in section]


def test_server_adds_ciphertexts_and_stores_them(exported):
    server = exported["config_fed_server.json"]
    components = {c["id"]: c for c in server["components"]}
    assert components["aggregator"]["path"] == "jobs.he.server.CiphertextSumAggregator"
    assert components["shareable_generator"]["path"] == "jobs.he.server.EncryptedAggregateShareableGenerator"
    assert components["persistor"]["path"] == "jobs.he.server.EncryptedAggregatePersistor"
    assert components["persistor"]["args"]["model"]["path"] == "models.network.SharedTrunk"
    workflow = server["workflows"][0]
    assert workflow["path"].endswith("ScatterAndGather")
    assert workflow["args"]["num_rounds"] == 2 and workflow["args"]["min_clients"] == 2


def test_members_encrypt_results_and_decrypt_task_data(exported):
    client = exported["config_fed_client.json"]
    (data_chain,) = client["task_data_filters"]
    (result_chain,) = client["task_result_filters"]
    assert data_chain["tasks"] == ["train"] and _paths(data_chain["filters"]) == ["jobs.he.filters.DecryptAggregate"]
    assert result_chain["tasks"] == ["train"]
    assert _paths(result_chain["filters"]) == ["jobs.he.filters.EncryptWeightedUpdate"]
    args = client["executors"][0]["executor"]["args"]
    assert args["task_script_path"].endswith("jobs/biomarker_mtl/client.py")
    assert "--config" in args["task_script_args"] and "--outputs" in args["task_script_args"]


def test_job_asks_for_the_sites_he_scope(exported):
    assert exported["meta.json"]["scope"] == "consortium-he"


def test_simulator_is_refused_with_the_fix(tiny_consortium, tmp_path):
    recipe = build_he_recipe(load_config(tiny_consortium), config_path=tiny_consortium, outputs=tmp_path, rounds=1)
    with pytest.raises(ValueError, match="cannot run in FLARE's simulator.*POC"):
        recipe.process_env(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
