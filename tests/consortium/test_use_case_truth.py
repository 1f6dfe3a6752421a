"""``consortium synth --kind trial|sites`` and the comparison of a run with the planted truth, on figures a
reader can check by hand (no model is trained here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from consortium.cli import main
from consortium.comparison import ArmPredictions, endpoint_figures
from consortium.use_case_truth import (
    bottom_of_ranking,
    drivers_recovered,
    dropout_against_truth,
    within_member_spearman,
)
from schema.config import load_config

TRUTH = {
    "kind": "trial",
    "drivers": [
        {"column": "distance_km", "inputs": ["distance_km"]},
        {"column": "visit_adherence", "inputs": ["visit_adherence"]},
        {"column": "adverse_events", "inputs": ["adverse_events"]},
        {"column": "age", "inputs": ["age"]},
        {"column": "arm", "inputs": ["arm=control", "arm=treatment"]},
    ],
    "members": {"big": {"patients": dict.fromkeys("abcdef", {})}, "small": {"patients": dict.fromkeys("ab", {})}},
}


def _ranking(*features: str) -> list[dict]:
    return [{"feature": f, "rank": i + 1} for i, f in enumerate(features)]


def _report(*, ranking: list[dict], federated: float, pooled: float, small_local: float) -> dict:
    arms = {"federated": federated, "local": federated - 0.01, "pooled": pooled, "ci": {"federated": [0.6, 0.8]}}
    small = {"federated": 0.62, "local": small_local, "pooled": 0.6, "ci": {}, "difference": {"federated-local": {}}}
    return {
        "endpoints": {"dropout": arms},
        "members": {"small": {"tasks": {"dropout": small}}, "big": {"tasks": {"dropout": arms}}},
        "biomarkers": {"model": {"dropout": ranking}},
    }


def test_a_driver_counts_once_when_any_of_its_inputs_is_in_the_top_8():
    ranking = _ranking(
        "bmi", "arm=treatment", "age", "sex=F", "arm=control", "region=west", "smoker=no", "age2", "distance_km"
    )
    [(endpoint, found)] = drivers_recovered({"biomarkers": {"model": {"dropout": ranking}}}, TRUTH).items()
    assert endpoint == "dropout"
    assert found["top"] == [r["feature"] for r in ranking[:8]]  # distance_km is ninth: not counted
    assert found["recovered"] == ["age", "arm"] and found["n_recovered"] == 2 and found["n_planted"] == 5


def test_dropout_checks_pass_and_fail_on_the_issues_thresholds():
    top = _ranking("visit_adherence", "age", "adverse_events", "arm=control", "bmi")
    passing = dropout_against_truth(_report(ranking=top, federated=0.74, pooled=0.755, small_local=0.58), TRUTH)
    assert passing["smallest_member"]["member"] == "small" and passing["smallest_member"]["patients"] == 2
    assert passing["checks"] == {
        "federated_at_least_pooled_minus_0.02": True,
        "smallest_member_federated_above_local": True,
        "drivers_in_top_8": True,
    }
    failing = dropout_against_truth(_report(ranking=top[:3], federated=0.73, pooled=0.755, small_local=0.63), TRUTH)
    assert failing["checks"] == {
        "federated_at_least_pooled_minus_0.02": False,
        "smallest_member_federated_above_local": False,
        "drivers_in_top_8": False,
    }


def test_spearman_within_members_is_weighted_by_sites_with_an_interval():
    # member one (4 sites): ranks agree fully, rho 1; member two (2 sites): reversed, rho -1; weights 4/6, 2/6
    truths = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0])]
    predictions = [np.array([10.0, 20.0, 30.0, 40.0]), np.array([5.0, 1.0])]
    result = within_member_spearman(truths, predictions, n_boot=200)
    assert result["estimate"] == pytest.approx(4 / 6 - 2 / 6) and result["n"] == 6
    low, high = result["ci"]
    assert -1.0 <= low <= high <= 1.0


def test_the_bottom_quarter_of_each_members_ranking_counts_the_non_enrolling_sites():
    # member x: 8 sites, bottom quarter = the 2 lowest predictions (sites 0, 1); non-enrolling: 0 and 5
    # member y: 4 sites, bottom quarter = the lowest (site 3); non-enrolling: 3
    held_out = pd.DataFrame(
        {
            "member": ["x"] * 8 + ["y"] * 4,
            "predicted": [0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.9, 0.8, 0.7, 0.1],
            "non_enrolling": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        }
    )
    result = bottom_of_ranking(held_out)
    assert result["non_enrolling"] == 3 and result["found_in_bottom"] == 2
    assert result["share_found"] == pytest.approx(2 / 3)
    assert result["non_enrolling_rate_in_bottom"] == pytest.approx(2 / 3)  # 2 of the 3 bottom sites
    assert result["non_enrolling_rate_overall"] == pytest.approx(3 / 12)


@pytest.mark.parametrize(
    ("kind", "members", "endpoints"),
    [
        ("trial", ["trial-a", "trial-b"], {"discontinued": "binary", "dropout": "survival"}),
        ("sites", ["sponsor-a", "sponsor-b"], {"enrolled_per_month": "regression", "non_enrolling": "binary"}),
    ],
)
def test_synth_kind_writes_a_clinical_only_consortium_with_shared_endpoints(
    tmp_path: Path, capsys, kind, members, endpoints
):
    out = tmp_path / kind
    assert main(["synth", "--kind", kind, "--out", str(out), "--sizes", "120,200", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    config = load_config(written["config"])
    assert [m.name for m in config.members] == members
    assert config.training.rounds == (10 if kind == "sites" else 5)
    assert config.panel.features is None and config.panel.file is None
    expected = "age" if kind == "trial" else "past_enrollment_rate"
    assert expected in {c.column for c in config.panel.clinical}
    for member in config.members:
        assert {t.name: t.type for t in member.tasks} == endpoints  # the same names at every member: shared
    assert [m["current"] for m in written["members"]] == [str(out / f"{m}.current.h5ad") for m in members]
    truth = json.loads(Path(written["ground_truth"]).read_text())
    assert truth["kind"] == kind and set(truth["members"]) == set(members)


def test_synth_refuses_an_unknown_kind_and_too_small_a_member(tmp_path: Path, capsys):
    assert main(["synth", "--kind", "omics", "--out", str(tmp_path / "a")]) == 2
    assert "--kind omics: use one of biomarkers, trial, sites" in capsys.readouterr().err
    assert main(["synth", "--kind", "trial", "--out", str(tmp_path / "b"), "--sizes", "80,200"]) == 2
    assert "needs >= 100" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_regression_endpoint_reports_each_arms_spearman_within_members():
    # member one (4 samples): federated orders them right (rho 1), pooled reversed (-1); member two (2 samples):
    # federated reversed, pooled right; weights 4/6 and 2/6
    arms = ArmPredictions(
        targets={"one": {"rate": np.array([1.0, 2.0, 3.0, 4.0])}, "two": {"rate": np.array([1.0, 2.0])}}
    )
    arms.add("federated", "one", {"rate": np.array([1.0, 2.0, 3.0, 4.0])})
    arms.add("pooled", "one", {"rate": np.array([4.0, 3.0, 2.0, 1.0])})
    arms.add("federated", "two", {"rate": np.array([2.0, 1.0])})
    arms.add("pooled", "two", {"rate": np.array([1.0, 2.0])})
    figures = endpoint_figures(arms, kinds={"rate": "regression"}, holders={"rate": ["one", "two"]}, seed=0)
    assert figures["rate"]["spearman_r"] == pytest.approx({"federated": 1 / 3, "pooled": -1 / 3})
