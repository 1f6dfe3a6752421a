"""The report's plots on a small synthetic report and site folders (no FLARE): one axes per panel, one line per
curve, and the PNGs written under ``<run>/plots/``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from consortium import plots
from jobs.site_outputs import SiteOutputs
from schema.report import Report

TASKS = {"pharma-a": ("a_response", "a_pfs"), "pharma-b": ("a_response", "b_marker", "b_pfs")}
KINDS = {"a_response": "binary", "a_pfs": "survival", "b_marker": "regression", "b_pfs": "survival"}
METRIC = {"binary": "auroc", "regression": "r2", "survival": "c_index"}


def _statistics(name: str, rng: np.random.Generator) -> list[dict]:
    effect, statistic = ("logHR", "statistic") if KINDS[name] == "survival" else ("logFC", "t")
    table = pd.DataFrame(
        {
            "feature": [f"G{i}" for i in range(30)],
            statistic: rng.normal(size=30),
            effect: rng.normal(size=30),
            "P.Value": np.sort(rng.uniform(1e-8, 1, size=30)),
            "members": 1,
        }
    )
    table["adj.P.Val"] = np.minimum(1, table["P.Value"] * 30 / np.arange(1, 31))
    return table.to_dict(orient="records")


@pytest.fixture
def report() -> dict:
    rng = np.random.default_rng(0)
    members = {
        member: {
            "samples": {"train": 60, "val": 20, "test": 20},
            "tasks": {
                task: {
                    "type": KINDS[task],
                    "metric": METRIC[KINDS[task]],
                    "federated": 0.7,
                    "local": 0.6,
                    "pooled": 0.72,
                    "ci": {"federated": [0.6, 0.8], "local": [0.5, 0.7], "pooled": [0.65, 0.8]},
                }
                for task in tasks
            },
        }
        for member, tasks in TASKS.items()
    }
    rounds = [
        {
            "round": r,
            "sites": {
                member: {
                    "train_loss": 3.0 - r,
                    "val": {task: {METRIC[KINDS[task]]: 0.5 + 0.1 * r} for task in tasks},
                }
                for member, tasks in TASKS.items()
            },
        }
        for r in range(3)
    ]
    endpoints = {
        name: {"type": kind, "metric": METRIC[kind], "members": [m for m, t in TASKS.items() if name in t]}
        for name, kind in KINDS.items()
    }
    for info in endpoints.values():
        info["shared"] = len(info["members"]) > 1
    model = {
        name: [{"feature": f"G{i}", "score": 1.0 / (i + 1), "direction": (-1) ** i, "rank": i + 1} for i in range(15)]
        for name in KINDS
    }
    out = {
        "consortium": "tiny",
        "job_id": "job-1",
        "env": "sim",
        "created": "2026-01-01T00:00:00+00:00",
        "members": members,
        "endpoints": endpoints,
        "definitions": {},
        "biomarkers": {
            "statistics": {name: _statistics(name, rng) for name in KINDS},
            "model": model,
            "consensus": [{"feature": "G0", "score": 1.0, "rank": 1}],
            "ground_truth": {"a_response": ["G0", "G1"]},
        },
        "rounds": rounds,
        "privacy": {"he": False, "dp": False, "shared": "trunk"},
        "timing": {"rounds": 3, "seconds_total": 1.0, "seconds_per_round": 0.3, "bytes_received_per_round": 1},
        "tracking": {},
    }
    Report.model_validate(out)
    return out


def _write_sites(root: Path, members: dict[str, tuple[str, ...]], *, n: int = 40) -> None:
    rng = np.random.default_rng(1)
    for member, tasks in members.items():
        predictions, targets = {}, {}
        for task in tasks:
            score = rng.normal(size=n)
            if KINDS[task] == "binary":
                y = (score + rng.normal(size=n) > 0).astype(float)
                y[0] = np.nan  # a missing label is masked, not plotted
                targets[task] = y
            elif KINDS[task] == "survival":
                targets[task] = np.column_stack([rng.exponential(np.exp(-score)), rng.uniform(size=n) < 0.7])
            else:
                targets[task] = score + rng.normal(size=n)
            predictions[task] = score
        SiteOutputs(root / member).save_predictions(predictions, targets=targets)


def test_metric_bars_one_axes_per_metric_with_interval_bars(report):
    fig = plots.metric_bars(report)
    assert isinstance(fig, Figure)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["auroc", "c_index", "r2"]
    auroc = fig.axes[0]
    assert len(auroc.patches) == 2 * 3  # two member-endpoints x three arms
    bars = [c for c in auroc.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["federated", "local", "pooled"]
    low, high = bars[0].errorbar.lines[2][0].get_segments()[0][:, 1]  # federated, first member: its interval
    assert (low, high) == pytest.approx((0.6, 0.8))


def test_learning_curves_one_axes_per_member_and_the_loss(report):
    fig = plots.learning_curves(report)
    assert len(fig.axes) == 3
    assert [len(ax.lines) for ax in fig.axes] == [2, 3, 2]
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.5, 0.6, 0.7])


def test_volcano_and_effect_directions_one_axes_per_endpoint(report):
    fig = plots.volcano(report)
    assert len(fig.axes) == len(KINDS)
    first = fig.axes[0]
    assert first.collections[0].get_offsets().shape == (30, 2)
    assert first.collections[1].get_offsets().shape == (2, 2)  # the planted features, ringed
    fig = plots.effect_directions(report, top=5)
    assert len(fig.axes) == len(KINDS)
    assert len(fig.axes[0].patches) == 5


def test_roc_and_kaplan_meier_from_the_members_predictions(report, tmp_path):
    _write_sites(tmp_path / "sites", TASKS)
    predictions = plots.read_site_predictions(tmp_path)
    roc = plots.roc_curves(report, predictions)
    assert [ax.get_title() for ax in roc.axes] == ["pharma-a: a_response", "pharma-b: a_response"]
    assert all(len(ax.lines) == 2 for ax in roc.axes)  # the curve and the chance diagonal
    assert "(n=39)" in roc.axes[0].get_legend().get_texts()[0].get_text()
    km = plots.kaplan_meier_by_risk(report, predictions)
    assert [ax.get_title() for ax in km.axes] == ["pharma-a: a_pfs", "pharma-b: b_pfs"]
    assert all(len(ax.lines) == 2 for ax in km.axes)  # low and high predicted risk
    assert km.axes[0].get_legend().get_title().get_text().startswith("log-rank p=")


def test_folds_are_joined_and_missing_members_named(report, tmp_path):
    for fold in (0, 1):
        _write_sites(tmp_path / "sites" / f"fold{fold}", {"pharma-b": TASKS["pharma-b"]}, n=10)
    predictions = plots.read_site_predictions(tmp_path)
    assert set(predictions) == {"pharma-b"}
    assert predictions["pharma-b"]["prediction"]["b_pfs"].shape == (20,)
    assert predictions["pharma-b"]["target"]["b_pfs"].shape == (20, 2)
    assert plots.missing_predictions(report, predictions, kind="survival") == ["pharma-a"]
    assert [ax.get_title() for ax in plots.kaplan_meier_by_risk(report, predictions).axes] == ["pharma-b: b_pfs"]


def test_save_report_plots_writes_the_pngs(report, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert {p.name for p in plots.save_report_plots(tmp_path)} == {
        "metrics.png",
        "learning_curves.png",
        "volcano.png",
        "effect_directions.png",
    }  # no site folders here: no ROC, no Kaplan-Meier
    _write_sites(tmp_path / "sites", TASKS)
    written = plots.save_report_plots(tmp_path)
    assert {p.name for p in written} >= {"roc.png", "kaplan_meier.png"}
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_statistics_tables_are_used_only_when_they_are_this_runs(report, tmp_path):
    folder = tmp_path / "biomarkers"
    folder.mkdir()
    kept = pd.DataFrame(report["biomarkers"]["statistics"]["a_response"])
    extra = kept.tail(1).assign(feature="G99", **{"P.Value": 0.99})
    pd.concat([kept, extra]).to_csv(folder / "statistics_a_response.csv", index=False)
    kept.iloc[::-1].to_csv(folder / "statistics_a_pfs.csv", index=False)  # another run's table
    tables = plots.statistics_tables(report, tmp_path)
    assert len(tables["a_response"]) == 31
    assert len(tables["a_pfs"]) == 30 and tables["a_pfs"]["feature"].iloc[0] == "G0"
