"""`consortium run` in FLARE's simulator: a real 2-member, 2-round job, its report, MLflow and the notebook."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anndata as ad
import mlflow
import nbclient
import nbformat
import pytest
import torch
import yaml

from consortium.audit import verify_log
from consortium.cli import main

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore_results.ipynb"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_run(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny consortium with DP-SGD on (epsilon 4 over the 2 planned rounds), run in the simulator."""
    out = tmp_path_factory.mktemp("sim_run")
    raw = yaml.safe_load(tiny_consortium.read_text())
    raw["privacy"]["dp"].update(enabled=True, epsilon=4.0)
    raw["panel"]["file"] = str(tiny_consortium.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(tiny_consortium.parent / member["data"])
    config = out / "dp_consortium.yaml"
    config.write_text(yaml.safe_dump(raw))
    shutil.copy(tiny_consortium.parent / "ground_truth.json", out / "ground_truth.json")
    args = ["run", "--config", str(config), "--env", "sim", "--out", str(out), "--rounds", "2", "--baselines"]
    assert main([*args, "--no-he"]) == 0
    return out


def test_report_has_every_member_task_and_figure(sim_run: Path):
    report = json.loads((sim_run / "report.json").read_text())
    assert set(report["members"]) == {"pharma-a", "pharma-b"}
    for member, info in report["members"].items():
        assert set(info["tasks"]) == {f"{member[-1]}_response", f"{member[-1]}_marker", f"{member[-1]}_pfs"}
        for entry in info["tasks"].values():
            assert entry["metric"] in {"auroc", "r2", "c_index"}
            for kind in ("federated", "local", "pooled"):
                assert isinstance(entry[kind], float)
            if entry["metric"] in ("auroc", "c_index"):
                assert 0.0 <= entry["federated"] <= 1.0
            assert 0.0 <= entry["precision_at_k"]["federated"] <= 1.0
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["timing"]["rounds"] == 2 and report["timing"]["bytes_sent_per_round"] > 0
    consensus = report["biomarkers"]["consensus"]
    assert [row["rank"] for row in consensus[:3]] == [1, 2, 3]
    assert consensus[0]["score"] >= consensus[1]["score"] >= consensus[2]["score"]
    assert set(report["biomarkers"]["tasks"]) == {"a_response", "a_marker", "a_pfs", "b_response", "b_marker", "b_pfs"}
    assert report["privacy"]["he"] is False and "trunk parameters only" in report["privacy"]["shared"]
    assert report["privacy"]["dp"] is True and report["privacy"]["epsilon_target"] == 4.0
    for epsilon in report["privacy"]["epsilon_spent"].values():
        assert 1.0 < epsilon <= 4.0 + 1e-6  # the budget spans all planned rounds and is not exceeded
    assert "| pharma-a | a_response | auroc |" in (sim_run / "report.md").read_text()


def test_bytes_sent_are_the_trunk_only(sim_run: Path, tiny_consortium: Path):
    from models.network import SharedTrunk
    from schema.config import load_config

    config = load_config(tiny_consortium)
    trunk = SharedTrunk(200, trunk_widths=config.training.trunk_widths, dropout=config.training.dropout)
    trunk_bytes = sum(t.numel() * t.element_size() for t in trunk.state_dict().values())
    report = json.loads((sim_run / "report.json").read_text())
    assert report["timing"]["bytes_sent_per_round_per_member"] == {"pharma-a": trunk_bytes, "pharma-b": trunk_bytes}


def test_mlflow_holds_member_runs_and_the_shared_model(sim_run: Path):
    report = json.loads((sim_run / "report.json").read_text())
    mlflow.set_tracking_uri(report["tracking"]["uri"])
    runs = mlflow.search_runs(experiment_names=[report["tracking"]["experiment"]])
    site_runs = runs[runs["tags.kind"].ne("shared-model")]
    assert len(site_runs) == 2
    client = mlflow.MlflowClient()
    for run_id in site_runs.run_id:
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0, 1]
    model = mlflow.pytorch.load_model(f"runs:/{report['tracking']['model_run_id']}/shared_trunk")
    assert model(torch.zeros(4, 200)).shape == (4, 64)
    shared = runs[runs["tags.kind"].eq("shared-model")].iloc[0]
    artifacts = {a.path for a in client.list_artifacts(shared.run_id, "biomarkers")}
    assert "biomarkers/consensus.csv" in artifacts
    assert not (Path.cwd() / "mlruns").exists() or not any((Path.cwd() / "mlruns").iterdir())


def test_audit_log_records_the_run(sim_run: Path):
    report = verify_log(sim_run / "audit.jsonl")
    assert report.ok
    events = [json.loads(line)["event"] for line in (sim_run / "audit.jsonl").read_text().splitlines()]
    assert events == ["job_submitted", "round_completed", "round_completed", "model_released"]


def test_notebook_runs_top_to_bottom(sim_run: Path, monkeypatch):
    monkeypatch.setenv("CONSORTIUM_RUN_DIR", str(sim_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    for name in ("metrics_comparison.png", "learning_curves.png", "biomarkers.png"):
        assert (sim_run / "figures" / name).stat().st_size > 10_000
    scores = ad.read_h5ad(sim_run / "biomarker_scores.h5ad")
    assert scores.n_vars == 200
    assert {"score_a_response", "rank_b_pfs", "consensus_score", "planted"} <= set(scores.var.columns)
    assert scores.var["consensus_rank"].min() == 1
    assert os.environ["CONSORTIUM_RUN_DIR"] == str(sim_run)
