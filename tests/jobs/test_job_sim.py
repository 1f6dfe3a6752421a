"""A real FLARE simulator run of the plaintext job: 2 members with one shared endpoint, 2 rounds (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.recipe import SimEnv

from jobs.recipe import build_recipe
from jobs.sections import finalize, sections_of
from jobs.store import read_aggregate
from models.network import SharedModel
from schema.config import load_config
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

pytestmark = pytest.mark.slow
MEMBERS = ("pharma-a", "pharma-b")


@pytest.fixture(scope="module")
def sim_run(shared_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The job run in SimEnv; returns (simulator workspace, sites' outputs root)."""
    out = tmp_path_factory.mktemp("sim")
    config = load_config(shared_consortium)
    recipe = build_recipe(
        config,
        he=False,
        config_path=shared_consortium,
        outputs=out / "sites",
        rounds=2,
        tracking_uri="sqlite:///" + str(out / "mlflow.db"),
    )
    recipe.run(SimEnv(clients=list(MEMBERS), workspace_root=str(out / "workspace")))
    return out / "workspace", out / "sites"


def _one(workspace: Path, name: str) -> Path:
    found = sorted(workspace.rglob(name))
    assert len(found) == 1, f"expected one {name} under {workspace}, found {found}"
    return found[0]


def test_server_records_what_each_site_published(sim_run):
    workspace, _ = sim_run
    records = [json.loads(line) for line in _one(workspace, PUBLISHED_FILE).read_text().splitlines()]
    assert len(records) == 4
    for site in MEMBERS:
        mine = sorted((r for r in records if r["site"] == site), key=lambda r: r["round"])
        assert [r["round"] for r in mine] == [0, 1]
        prefix = site[-1]
        tasks = {f"{prefix}_response", f"{prefix}_marker", "pfs"}
        assert all(set(r["val"]) == tasks and r["bytes_received"] > 0 and r["steps"] > 0 for r in mine)
        assert "test" not in mine[0]  # the test split is touched once, in the last round
        assert set(mine[1]["test"]) == tasks
        assert all(len(m["ci"]) == 2 for m in mine[1]["test"].values())


def test_the_stored_global_model_holds_shared_state_and_statistics_only(sim_run, shared_consortium):
    workspace, sites = sim_run
    config = load_config(shared_consortium)
    path = _one(workspace, GLOBAL_MODEL_FILE)
    stored = read_aggregate(path)
    assert stored.encrypted is None
    plain = finalize(stored.params, stored.meta)

    spec_args = {
        "n_features": 200,
        "shared_tasks": ["pfs"],
        "trunk_widths": config.training.trunk_widths,
        "head_width": config.training.head_width,
    }
    shared_keys = set(SharedModel(**spec_args).state_dict())
    assert {k for k in plain if k.startswith(("trunk.", "heads."))} == shared_keys
    assert any(k.startswith("heads.pfs.") for k in plain)
    private = ("heads.a_response.", "heads.a_marker.", "heads.b_response.", "heads.b_marker.")
    assert not [k for k in plain if k.startswith(private) or k.endswith((".target_mean", ".target_scale"))]
    endpoints = {"a_response", "a_marker", "b_response", "b_marker", "pfs"}
    assert {k.split(".")[1] for k in plain if k.startswith("stats.")} == endpoints
    assert {k.split(".")[1] for k in plain if k.startswith("consensus.")} == endpoints

    sections = sections_of(stored.meta)
    assert sections["trunk"].contributors == 2 and sections["head:pfs"].contributors == 2
    assert sections["stats:pfs"].contributors == 2 and sections["stats:a_response"].contributors == 1
    assert np.allclose(plain["consensus.pfs.members"], 2.0)  # both members ranked the shared endpoint
    for member in MEMBERS:  # each site kept its own full model, private heads included
        assert (sites / member / "model.pt").exists() and (sites / member / "predictions.npz").exists()


def test_each_member_has_an_mlflow_run_named_after_it_with_its_parameters(sim_run, shared_consortium):
    """The server's receiver (jobs.tracking.MemberRuns): a run per member, named after it, tagged with the
    job id the report gives a simulated job (its name), holding the member's parameters and its figures."""
    import mlflow

    workspace, _ = sim_run
    config = load_config(shared_consortium)
    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + str(workspace.parent / "mlflow.db"))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(MEMBERS)
    for member, run in runs.items():
        assert run.data.tags["job_id"] == build_recipe(config, he=False).name == "synthetic-consortium-biomarker-mtl"
        assert run.data.tags["member"] == member and run.data.tags["kind"] == "member"
        assert run.data.params["member"] == member and run.data.params["org"] == config.member(member).org
        assert run.data.params["rounds"] == "2" and run.data.params["aggregation"] == "fedavg"
        assert "pfs:survival (shared)" in run.data.params["tasks"].split(",")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
