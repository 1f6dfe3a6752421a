"""`consortium stats` in FLARE's simulator: one real job, only summed statistics, equal to the pooled
analysis stratified by member (statsmodels for the regression endpoint; the site's own sums for all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import yaml

from consortium.audit import verify_log
from jobs import member_data
from omics.association import association_table, combine, site_statistics
from schema.config import load_config

pytestmark = pytest.mark.slow
SHARED = {"response": "binary", "marker": "regression", "pfs": "survival"}


@pytest.fixture(scope="module")
def shared_config(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny consortium with its three endpoints shared by both members (each maps its own columns)."""
    out = tmp_path_factory.mktemp("stats_consortium")
    raw = yaml.safe_load(tiny_consortium.read_text())
    raw["panel"]["file"] = str(tiny_consortium.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(tiny_consortium.parent / member["data"])
        for task in member["tasks"]:
            task["name"] = task["name"].split("_", 1)[1]
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
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout)


def expected_tables(config_path: Path) -> dict[str, pd.DataFrame]:
    """What the members' own sums give when added here, outside FLARE."""
    config = load_config(config_path)
    per_endpoint: dict[str, list] = {}
    for member in config.members:
        loaded = member_data.load_member(config, member.name)
        for task in member.tasks:
            per_endpoint.setdefault(task.name, []).append(
                site_statistics(
                    loaded.log_expression,
                    loaded.data.targets[task.name],
                    kind=task.type,
                    measured=loaded.measured,
                    min_cell=config.data.min_cell_count,
                )
            )
    features = config.panel_features()
    return {
        name: association_table(combine(stats), kind=SHARED[name], feature_names=features)
        for name, stats in per_endpoint.items()
    }


def test_stats_json_and_files(stats_run):
    out, result = stats_run
    assert result["statistics_path"] == str(out / "statistics.json")
    assert result["statistics"] == json.loads((out / "statistics.json").read_text())
    endpoints = result["statistics"]["endpoints"]
    assert set(endpoints) == set(SHARED)
    for name, entry in endpoints.items():
        assert entry["type"] == SHARED[name]
        assert entry["members"] == ["pharma-a", "pharma-b"]
        rows = entry["statistics"]
        assert [r["pvalue"] for r in rows] == sorted(r["pvalue"] for r in rows)
        # a feature a member does not measure (or a small cell) counts only the others
        assert {r["members"] for r in rows} <= {1, 2} and sum(r["members"] == 2 for r in rows) > len(rows) / 2
        assert all(r["effect"] > 0 for r in entry["markers"])
        assert (out / "statistics" / f"statistics_{name}.csv").exists()
    assert not list((out / "statistics").glob("model_*.csv"))  # no training, no model ranking
    assert verify_log(out / "audit.jsonl").ok
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert "job_submitted" in events and events[-1] == "statistics_released"


def test_federated_statistics_equal_the_members_sums(stats_run, shared_config: Path):
    out, result = stats_run
    for name, table in expected_tables(shared_config).items():
        got = pd.DataFrame(result["statistics"]["endpoints"][name]["statistics"]).set_index("feature")
        want = table.set_index("feature").loc[got.index]
        for column in ("statistic", "effect", "pvalue", "qvalue"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-6, atol=1e-12, err_msg=f"{name} {column}")


def test_regression_equals_pooled_ols_with_member_covariate(stats_run, shared_config: Path):
    """statsmodels on the pooled data: marker level ~ feature + member; the slope and its p-value."""
    out, result = stats_run
    config = load_config(shared_config)
    rows, targets, member_of = [], [], []
    for index, member in enumerate(config.members):
        loaded = member_data.load_member(config, member.name)
        rows.append(np.asarray(loaded.log_expression, dtype=np.float64))
        targets.append(np.asarray(loaded.data.targets["marker"], dtype=np.float64))
        member_of.append(np.full(len(targets[-1]), index))
    X, y, member = np.vstack(rows), np.concatenate(targets), np.concatenate(member_of)
    labelled = np.isfinite(y)
    features = config.panel_features()
    got = {r["feature"]: r for r in result["statistics"]["endpoints"]["marker"]["statistics"]}
    for feature in [r["feature"] for r in result["statistics"]["endpoints"]["marker"]["statistics"][:3]]:
        j = features.index(feature)
        design = np.column_stack([X[labelled, j], np.ones(labelled.sum()), member[labelled] == 1]).astype(float)
        fit = sm.OLS(y[labelled], design).fit()
        assert got[feature]["effect"] == pytest.approx(fit.params[0], rel=1e-6)
        assert got[feature]["pvalue"] == pytest.approx(fit.pvalues[0], rel=1e-5, abs=1e-300)
