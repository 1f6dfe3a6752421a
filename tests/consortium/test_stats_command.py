"""`consortium stats` in FLARE's simulator: one real job, only summed pieces, equal to the pooled analysis the
field trusts: limma (pylimma) with endpoint + age + sex + member for the binary and regression endpoints,
and the Cox score test given age and sex, stratified by member (statsmodels), for the survival endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.duration.hazard_regression import PHReg

from consortium.audit import verify_log
from jobs import member_data
from schema.config import load_config

pytestmark = pytest.mark.slow
SHARED = {"response": "binary", "marker": "regression", "pfs": "survival"}


@pytest.fixture(scope="module")
def shared_config(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny consortium with its three endpoints shared by both members (each maps its own columns);
    synth declares age and sex as covariates."""
    out = tmp_path_factory.mktemp("stats_consortium")
    raw = yaml.safe_load(tiny_consortium.read_text())
    raw["panel"]["file"] = str(tiny_consortium.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(tiny_consortium.parent / member["data"])
        for task in member["tasks"]:
            task["name"] = task["name"].split("_", 1)[1]
    assert raw["statistics"]["covariates"] == {"age": "numeric", "sex": ["F", "M"]}
    path = out / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def stats_run(shared_config: Path) -> tuple[Path, dict]:
    out = shared_config.parent / "stats"
    done = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "stats", "--config", str(shared_config), "--env", "sim"]
        + ["--no-he", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "plaintext aggregation (HE off): the operator reads each member's update" in done.stderr
    return out, json.loads(done.stdout)


def pooled(config_path: Path, endpoint: str) -> dict:
    """Every member's samples with a label for ``endpoint``, stacked: log expression, target, covariates."""
    config = load_config(config_path)
    parts = []
    for index, member in enumerate(config.members):
        loaded = member_data.load_member(config, member.name)
        target = loaded.data.targets[endpoint]
        rows = ~np.isnan(target.reshape(len(target), -1)).any(axis=1)
        obs = loaded.statistics.obs.iloc[np.flatnonzero(rows)]
        parts.append(
            {
                "Y": loaded.log_expression[rows],
                "target": target[rows],
                "age": obs["age"].to_numpy(float),
                "male": (obs["sex"].astype(str) == "M").to_numpy(float),
                "member": np.full(rows.sum(), index),
                "measured": loaded.measured,
            }
        )
    out = {key: np.concatenate([p[key] for p in parts]) for key in ("Y", "target", "age", "male", "member")}
    out["measured_by_all"] = np.logical_and.reduce([p["measured"] for p in parts])
    out["features"] = config.panel_features()
    return out


def test_stats_json_and_files(stats_run):
    out, result = stats_run
    assert result["statistics_path"] == str(out / "statistics.json")
    assert result["statistics"] == json.loads((out / "statistics.json").read_text())
    endpoints = result["statistics"]["endpoints"]
    assert set(endpoints) == set(SHARED)
    for name, entry in endpoints.items():
        assert entry["type"] == SHARED[name]
        assert entry["members"] == ["pharma-a", "pharma-b"]
        assert entry["design"]["formula"] == "~ endpoint + age + sex"
        rows = entry["statistics"]
        assert [r["P.Value"] for r in rows] == sorted(r["P.Value"] for r in rows)
        # two members: a row needs both (statistics.min_members defaults to every member of a smaller consortium)
        assert {r["members"] for r in rows} == {2} and entry["withheld_min_members"] > 0
        effect = "logHR" if name == "pfs" else "logFC"
        assert all(r[effect] > 0 for r in entry["markers"]) and all(r[effect] < 0 for r in entry["markers_down"])
        assert (out / "statistics" / f"statistics_{name}.csv").exists()
    assert endpoints["pfs"]["design"]["cox_fit"]["converged"]
    assert not list((out / "statistics").glob("model_*.csv"))  # no training, no model ranking
    assert verify_log(out / "audit.jsonl").ok
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert "job_submitted" in events and events[-1] == "statistics_released"


@pytest.mark.parametrize("endpoint", ["response", "marker"])
def test_binary_and_regression_equal_pooled_limma_with_covariates_and_member(stats_run, shared_config, endpoint):
    pylimma = pytest.importorskip("pylimma")
    out, result = stats_run
    data = pooled(shared_config, endpoint)
    keep = data["measured_by_all"]
    design = np.column_stack(
        [np.ones(len(data["target"])), data["member"] == 1, data["target"], data["age"], data["male"]]
    ).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pylimma.e_bayes(pylimma.lm_fit(data["Y"][:, keep].T, design), legacy=True)
    theirs = pylimma.top_table(reference, coef=2, number=np.inf, sort_by="none")
    theirs.index = np.asarray(data["features"])[keep]
    got = pd.DataFrame(result["statistics"]["endpoints"][endpoint]["statistics"]).set_index("feature")
    theirs = theirs.loc[got.index]
    np.testing.assert_allclose(got["logFC"], theirs["log_fc"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["t"], theirs["t"], rtol=1e-6)
    np.testing.assert_allclose(got["P.Value"], theirs["p_value"], rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(got["AveExpr"], theirs["ave_expr"], rtol=1e-9)


def test_survival_equals_the_stratified_cox_score_test_given_age_and_sex(stats_run, shared_config):
    out, result = stats_run
    data = pooled(shared_config, "pfs")
    time, event = data["target"][:, 0], data["target"][:, 1]
    Z = np.column_stack([data["age"], data["male"]])
    beta = PHReg(time, Z, status=event, strata=data["member"], ties="efron").fit(disp=False).params
    rows = result["statistics"]["endpoints"]["pfs"]["statistics"]
    for row in rows[:3] + rows[-2:]:
        j = data["features"].index(row["feature"])
        model = PHReg(time, np.column_stack([Z, data["Y"][:, j]]), status=event, strata=data["member"], ties="efron")
        params = np.append(beta, 0.0)
        score, information = model.score(params), -model.hessian(params)
        chi2 = score[-1] ** 2 * np.linalg.inv(information)[-1, -1]
        assert row["statistic"] ** 2 == pytest.approx(chi2, rel=1e-6)
