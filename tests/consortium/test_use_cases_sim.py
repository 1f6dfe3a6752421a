"""The dropout and site-selection use cases end to end in FLARE's simulator, as docs/use-cases.md types them:
``consortium synth --kind trial|sites`` -> ``consortium run --env sim --baselines`` -> ``consortium score``
of the current patients or candidate sites, each checked against the planted truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from consortium.cli import main
from consortium.use_case_truth import dropout_against_truth, load_json, scores_against_truth, sites_against_truth
from schema.config import load_config
from tests.helpers import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "use_cases.ipynb"

pytestmark = pytest.mark.slow


def _synth_and_run(folder: Path, kind: str) -> tuple[Path, Path]:
    config = folder / "consortium.yaml"
    assert main(["synth", "--kind", kind, "--out", str(folder), "--seed", "0"]) == 0
    run = folder / "run"
    done = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "run", "--config", str(config), "--env", "sim", "--out", str(run)]
        + ["--baselines", "--no-he", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return config, run


def _score(config: Path, run: Path, member: str, out: Path, *alerts: str) -> pd.DataFrame:
    data = config.parent / f"{member}.current.h5ad"
    argv = ["score", str(data), "--config", str(config), "--member", member, "--run", str(run), "--out", str(out)]
    assert main([*argv, *(a for alert in alerts for a in ("--alert", alert))]) == 0
    return pd.read_csv(out)


def test_dropout_risk_federated_matches_pooled_beats_local_for_the_smallest_and_finds_the_drivers(tmp_path: Path):
    config, run = _synth_and_run(tmp_path, "trial")
    report, truth = load_json(run / "report.json"), load_json(tmp_path / "ground_truth.json")
    result = dropout_against_truth(report, truth)
    assert result["checks"] == {
        "federated_at_least_pooled_minus_0.02": True,
        "smallest_member_federated_above_local": True,
        "drivers_in_top_8": True,
    }, json.dumps(result, indent=1)
    for member, figures in result["calibration"].items():  # the probabilities of discontinuing, calibrated
        assert 0.0 < figures["brier"] < 0.25 and 0.5 < figures["calibration_slope"] < 2.0, (member, figures)
    within = result["c_index_within_members"]
    low, high = within["ci"]["federated"]
    assert within["federated"] > 0.7 and low < within["federated"] < high
    # the report names the clinical inputs by their column (a categorical by column=level)
    assert {"distance_km", "visit_adherence"} <= set(result["drivers"]["dropout"]["top"])
    # the smallest member scores its patients now on trial; the at-risk list stays at the site
    scores = _score(config, run, "trial-a", tmp_path / "at_risk.csv", "discontinued>0.8")
    assert scores_against_truth(tmp_path / "at_risk.csv", truth, member="trial-a", column="dropout")["spearman"] > 0.6
    alert = [c for c in scores.columns if c.startswith("alert")]
    assert alert and 0 < scores[alert[0]].astype(bool).sum() < len(scores)
    shown = run_notebook(NOTEBOOK, tmp_path / "use_cases.ipynb", trial_dir=str(tmp_path))
    assert not shown["errors"] and "5 of 5 planted drivers in the top 8" in shown["text"]
    assert "no sites_dir given" in shown["text"] and "current patients: Spearman" in shown["text"]


def test_site_selection_ranks_held_out_and_candidate_sites_by_their_true_rate(tmp_path: Path):
    config, run = _synth_and_run(tmp_path, "sites")
    report, truth = load_json(run / "report.json"), load_json(tmp_path / "ground_truth.json")
    result = sites_against_truth(report, truth, config=load_config(config), run=run)
    assert result["checks"] == {"spearman_at_least_0.6": True, "federated_at_least_pooled_minus_0.02": True}, (
        json.dumps(result, indent=1)
    )
    bottom = result["non_enrolling_in_bottom_quarter"]
    assert bottom["share_found"] > 0.35  # a random ranking finds a quarter of them there
    assert bottom["non_enrolling_rate_in_bottom"] > 1.5 * bottom["non_enrolling_rate_overall"]
    _score(config, run, "sponsor-a", tmp_path / "candidates.csv")
    ranked = scores_against_truth(tmp_path / "candidates.csv", truth, member="sponsor-a", column="enrolled_per_month")
    assert ranked["spearman"] > 0.6 and ranked["n"] == 50
    shown = run_notebook(NOTEBOOK, tmp_path / "use_cases.ipynb", sites_dir=str(tmp_path))
    assert not shown["errors"] and shown["images"] == 1 and "Spearman, predicted vs true rate" in shown["text"]
