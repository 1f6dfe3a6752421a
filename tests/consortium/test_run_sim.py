"""`consortium run` in FLARE's simulator: a real 2-member, 2-round job, its report, MLflow and the notebook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import mlflow
import papermill
import pytest
import torch

from consortium.audit import verify_log
from consortium.backends.threads import shared_threads
from consortium.processes import stop_processes_under
from schema.names import JOB_ENDED_FILE
from tests.helpers import relocated_config

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore_results.ipynb"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_run(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny consortium with DP-SGD on (epsilon 4 over the 2 planned rounds), run in the simulator."""
    out = tmp_path_factory.mktemp("sim_run")
    dp = {"enabled": True, "epsilon": 4.0}
    config = relocated_config(tiny_consortium, out, name="dp_consortium.yaml", privacy={"dp": dp})
    shutil.copy(tiny_consortium.parent / "ground_truth.json", out / "ground_truth.json")
    args = ["run", "--config", str(config), "--env", "sim", "--out", str(out), "--rounds", "2", "--baselines"]
    # the console script, as a user runs it: with --json, stdout must hold the JSON object and nothing else
    done = subprocess.run(
        [sys.executable, "-m", "consortium.cli", *args, "--no-he", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (out.parent / f"{out.name}.stdout").write_text(done.stdout)
    return out


def test_members_share_the_cores_of_the_machine(sim_run: Path):
    """Two member processes on one machine: each torch gets its share of the cores, not all of them."""
    expected = os.environ.get("OMP_NUM_THREADS") or shared_threads(2)["OMP_NUM_THREADS"]
    for member in ("pharma-a", "pharma-b"):
        [site_log] = [p for p in (sim_run / "flare").rglob("log.txt") if p.parent.name == member]
        assert f"site {member}: torch uses {expected} threads" in site_log.read_text()


def test_simulated_members_ask_for_their_next_task_without_the_simulators_half_second_retries(sim_run: Path):
    """jobs.flare_tuning.SimulatorTaskPacing ran in each member's worker process, before its first task."""
    for member in ("pharma-a", "pharma-b"):
        [site_log] = [p for p in (sim_run / "flare").rglob("log.txt") if p.parent.name == member]
        text = site_log.read_text()
        assert "asks for its next task at the server's interval, no 0.5 s retries" in text
        assert "stay at the default" not in text


def test_run_json_is_one_object_on_stdout(sim_run: Path):
    result = json.loads((sim_run.parent / f"{sim_run.name}.stdout").read_text())
    assert result["report_path"] == str(sim_run / "report.json")
    assert result["markdown_path"] == str(sim_run / "report.md")
    assert result["report"] == json.loads((sim_run / "report.json").read_text())
    assert result["job_ids"] == [result["report"]["job_id"]]


def test_report_has_every_member_task_and_figure(sim_run: Path):
    report = json.loads((sim_run / "report.json").read_text())
    assert set(report["members"]) == {"pharma-a", "pharma-b"}
    for member, info in report["members"].items():
        assert set(info["tasks"]) == {f"{member[-1]}_response", f"{member[-1]}_marker", f"{member[-1]}_pfs"}
        for entry in info["tasks"].values():
            assert entry["metric"] in {"auroc", "r2", "c_index"}
            for arm in ("federated", "local", "pooled", "linear_local", "linear_pooled"):
                assert isinstance(entry[arm], float)
                low, high = entry["ci"][arm]
                assert low <= entry[arm] <= high
            for key in ("federated-local", "federated-pooled"):
                diff = entry["difference"][key]
                assert diff["gain"] == (diff["ci"][0] > 0)
            if entry["metric"] in ("auroc", "c_index"):
                assert 0.0 <= entry["federated"] <= 1.0
            assert 0.0 <= entry["precision_at_k"]["federated"] <= 1.0
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["timing"]["rounds"] == 2 and report["timing"]["bytes_received_per_round"] > 0
    for name in ("a_response", "b_pfs"):
        stats = report["biomarkers"]["statistics"][name]
        assert [row["P.Value"] for row in stats] == sorted(row["P.Value"] for row in stats)
        limma = {"feature", "symbol", "logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B", "members", "samples"}
        cox = {"feature", "symbol", "statistic", "logHR", "se", "P.Value", "adj.P.Val", "members", "samples", "events"}
        assert set(stats[0]) == (cox if name.endswith("pfs") else limma)
        assert {"feature", "score", "direction", "frequency", "rank"} <= set(report["biomarkers"]["model"][name][0])
    truth = report["biomarkers"]["ground_truth"]
    top = {row["feature"] for row in report["biomarkers"]["statistics"]["b_pfs"][:10]}
    assert len(top & set(truth["b_pfs"])) >= 5  # the planted survival markers lead the federated statistics
    assert report["privacy"]["he"] is False and "trunk and the heads of shared endpoints" in report["privacy"]["shared"]
    assert report["privacy"]["dp"] is True and report["privacy"]["epsilon_target"] == 4.0
    for epsilon in report["privacy"]["epsilon_spent"].values():
        assert 1.0 < epsilon <= 4.0 + 1e-6  # the budget spans all planned rounds and is not exceeded
    markdown = (sim_run / "report.md").read_text()
    assert "| pharma-a | a_response | auroc |" in markdown
    assert "federated - local" in markdown and "gain" in markdown


def test_per_round_records_carry_validation_only_and_test_once(sim_run: Path):
    report = json.loads((sim_run / "report.json").read_text())
    first, last = report["rounds"]
    for site in ("pharma-a", "pharma-b"):
        assert set(first["sites"][site]["val"]) == {f"{site[-1]}_response", f"{site[-1]}_marker", f"{site[-1]}_pfs"}
        assert "test" not in first["sites"][site]


def test_mlflow_holds_member_runs_and_the_shared_model(sim_run: Path):
    report = json.loads((sim_run / "report.json").read_text())
    mlflow.set_tracking_uri(report["tracking"]["uri"])
    runs = mlflow.search_runs(experiment_names=[report["tracking"]["experiment"]])
    site_runs = runs[runs["tags.kind"].ne("shared-model")]
    assert len(site_runs) == 2
    client = mlflow.MlflowClient()
    for run_id in site_runs.run_id:
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0, 1]
        assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("test/")]
    model = mlflow.pytorch.load_model(f"runs:/{report['tracking']['model_run_id']}/shared_model")
    assert model(torch.zeros(4, 200)).shape == (4, 64)
    shared = runs[runs["tags.kind"].eq("shared-model")].iloc[0]
    artifacts = {a.path for a in client.list_artifacts(shared.run_id, "biomarkers")}
    assert {"biomarkers/statistics_a_pfs.csv", "biomarkers/model_b_marker.csv"} <= artifacts
    assert not (Path.cwd() / "mlruns").exists() or not any((Path.cwd() / "mlruns").iterdir())


def test_audit_log_records_the_run(sim_run: Path):
    report = verify_log(sim_run / "audit.jsonl")
    assert report.ok
    events = [json.loads(line)["event"] for line in (sim_run / "audit.jsonl").read_text().splitlines()]
    assert events == ["job_submitted", "round_completed", "round_completed", "model_released"]
    entries = [json.loads(line) for line in (sim_run / "audit.jsonl").read_text().splitlines()]
    job_id = json.loads((sim_run / "report.json").read_text())["job_id"]
    assert {e["details"]["job_id"] for e in entries} == {job_id}


def test_report_plots_are_written_with_the_report(sim_run: Path):
    written = {p.name for p in (sim_run / "plots").glob("*.png")}
    assert written == {
        "metrics.png",
        "learning_curves.png",
        "volcano.png",
        "effect_directions.png",
        "roc.png",
        "kaplan_meier.png",
    }
    assert all((sim_run / "plots" / name).stat().st_size > 10_000 for name in written)


def test_notebook_runs_top_to_bottom(sim_run: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CONSORTIUM_RUN_DIR", raising=False)  # the parameter alone says which run
    executed = papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "explore_results.ipynb"),
        parameters=dict(run_dir=str(sim_run), out_dir=str(tmp_path / "out"), top_features=5),
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in executed.cells)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6  # metric bars, learning curves, volcano, effect directions, ROC, Kaplan-Meier
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "predictions here for: pharma-a, pharma-b" in text and "no predictions.npz" not in text
    assert not (sim_run / "biomarker_scores.h5ad").exists()  # the notebook writes nothing into the run
    scores = ad.read_h5ad(tmp_path / "out" / "biomarker_scores.h5ad")
    assert scores.n_vars == 200
    assert {"effect_a_response", "qvalue_b_pfs", "score_a_response", "rank_b_pfs", "consensus_score", "planted"} <= set(
        scores.var.columns
    )
    assert scores.var["consensus_rank"].min() == 1


def test_the_command_leaves_once_the_job_ended_and_no_simulator_process_outlives_it(sim_run: Path):
    """The report is written while FLARE's simulator sleeps out its grace periods; the command ends it
    once the job has ended (every server component, the MLflow receiver included, has ended it)."""
    [mark] = (sim_run / "flare").rglob(JOB_ENDED_FILE)
    stages = json.loads(mark.read_text())
    assert stages["fatal"] is False and stages["results_at"] <= stages["ended_at"]
    assert stop_processes_under(sim_run / "flare") == 0
