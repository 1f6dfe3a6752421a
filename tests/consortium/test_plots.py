"""The report's plots on a small synthetic report and site folders (no FLARE): one axes per panel, one line per
curve, and the PNGs written under ``<run>/plots/``."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import papermill
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from consortium import plots
from jobs.site_outputs import SiteOutputs
from schema.report import Report

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore_results.ipynb"
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
    table["symbol"] = _symbols(30)
    return table.to_dict(orient="records")


def _symbols(n: int) -> list[str]:
    """Gene symbols for the even features; '' (no symbol in any member's file) for the odd ones."""
    return [f"SYM{i}" if i % 2 == 0 else "" for i in range(n)]


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
            "sites": {  # in the order the members' results arrived, not the config's
                member: {
                    "train_loss": 3.0 - r,
                    "val": {task: {METRIC[KINDS[task]]: 0.5 + 0.1 * r} for task in tasks},
                }
                for member, tasks in reversed(TASKS.items())
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
    endpoints["a_pfs"]["time_unit"] = "months"  # b_pfs declares none
    model = {
        name: [
            {
                "feature": f"G{i}",
                "symbol": _symbols(15)[i],
                "score": 1.0 / (i + 1),
                "direction": (-1) ** i,
                "rank": i + 1,
            }
            for i in range(15)
        ]
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
            "consensus": [{"feature": "G0", "symbol": "SYM0", "score": 1.0, "rank": 1}],
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


def _drawn(fig: Figure):
    """The figure laid out and drawn; its renderer (to measure where text and legends ended up)."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlaps_an_axes(fig: Figure, box) -> bool:
    return any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_metric_intervals_dot_and_interval_per_arm_on_an_axis_that_spans_the_intervals(report):
    report["members"]["pharma-b"]["tasks"]["b_marker"].update(federated=0.97, ci={"federated": [0.96, 0.98]})
    report["members"]["pharma-b"]["tasks"]["b_marker"].update(local=1.0, pooled=0.99)
    fig = plots.metric_intervals(report)
    assert isinstance(fig, Figure)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["AUROC", "C-index", "R²"]
    auroc = fig.axes[0]
    assert [t.get_text() for t in auroc.get_yticklabels()] == ["pharma-a\na_response", "pharma-b\na_response"]
    dots = [c for c in auroc.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in dots] == ["federated", "local", "pooled"]
    federated = dots[0]
    assert list(federated.lines[0].get_xdata()) == pytest.approx([0.7, 0.7])
    low, high = federated.lines[2][0].get_segments()[0][:, 0]  # the first member's federated interval
    assert (low, high) == pytest.approx((0.6, 0.8))
    # the axis spans the intervals with a margin (up to R²'s bound of 1), not 0 to 1: 0.97 and 1.0 lie
    # nearly half the axis apart, not 3% of it
    left, right = fig.axes[2].get_xlim()
    assert (left, right) == pytest.approx((0.94, 1.005))
    assert (1.0 - 0.97) / (right - left) > 0.4
    renderer = _drawn(fig)
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["federated", "local", "pooled"]
    assert not _overlaps_an_axes(fig, legend.get_window_extent(renderer))  # the legend hides no interval


def test_learning_curves_one_axes_per_member_in_config_order_and_the_loss(report):
    fig = plots.learning_curves(report)
    assert [ax.get_title() for ax in fig.axes] == ["pharma-a: validation", "pharma-b: validation", "training loss"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 3, 2]
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.5, 0.6, 0.7])
    assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()] == ["pharma-a", "pharma-b"]
    renderer = _drawn(fig)
    for ax in fig.axes:
        assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent())


def test_volcano_labels_the_top_features_by_symbol_inside_the_axes_without_overlap(report):
    fig = plots.volcano(report, label_top=6)
    assert len(fig.axes) == len(KINDS)
    first = fig.axes[0]
    assert first.collections[0].get_offsets().shape == (30, 2)
    assert first.collections[1].get_offsets().shape == (2, 2)  # the planted features, ringed
    # the statistics are by p: the top 6 are G0..G5, the odd ones without a symbol keep their id
    assert sorted(t.get_text() for t in first.texts) == ["G1", "G3", "G5", "SYM0", "SYM2", "SYM4"]
    renderer = _drawn(fig)
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        inside = ax.get_window_extent(renderer).padded(1)  # adjustText may leave a label on the edge
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
        assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    [legend] = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[2:] == ["q ≥ 0.05", "planted (synthetic data)"]
    assert texts[0].startswith("higher in the positive class / higher with the target / higher risk")
    assert not _overlaps_an_axes(fig, legend.get_window_extent(renderer))


def test_effect_directions_names_features_by_symbol_with_a_colour_legend(report):
    report["biomarkers"]["model"] = dict(reversed(report["biomarkers"]["model"].items()))  # the release's order
    fig = plots.effect_directions(report, top=5)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == list(KINDS)  # the config's order of endpoints
    assert len(fig.axes[0].patches) == 5
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["SYM4", "G3", "SYM2", "G1", "SYM0"]  # rank 1 on top
    assert all(t.get_fontsize() >= 9 for t in fig.axes[0].get_yticklabels())
    [legend] = fig.legends
    assert [p.get_facecolor() for p in legend.get_patches()] == [to_rgba("tab:red"), to_rgba("tab:blue")]
    assert not _overlaps_an_axes(fig, legend.get_window_extent(_drawn(fig)))


def test_a_symbol_only_the_report_knows_labels_a_full_table_without_one(report):
    table = pd.DataFrame(report["biomarkers"]["statistics"]["a_response"]).drop(columns="symbol")
    fig = plots.volcano(report, statistics={"a_response": table}, label_top=1)
    assert [t.get_text() for t in fig.axes[0].texts] == ["SYM0"]


def test_region_forest_by_symbol_with_one_region_legend(report):
    regions = [
        {"feature": f"G{i}", "region": region, "effect": 0.1 * i, "ci_low": 0.1 * i - 0.2, "ci_high": 0.1 * i + 0.2}
        for i in range(3)
        for region in ("EU", "US")
    ]
    report["biomarkers"]["statistics_release"] = {"a_response": {"regions": regions}}
    fig = plots.region_forest(report, top=3)
    labels = [t.get_text().split("\n")[0] for t in fig.axes[0].get_yticklabels()]
    assert labels == ["SYM0", "G1", "SYM2"]
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["EU", "US"]
    assert "forest_by_region" in plots.report_figures(report, {})


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


def test_kaplan_meier_starts_at_time_0_with_the_declared_unit(report, tmp_path):
    _write_sites(tmp_path / "sites", TASKS)
    predictions = plots.read_site_predictions(tmp_path)
    first = predictions["pharma-a"]["target"]["a_pfs"][:, 0].min()
    predictions["pharma-a"]["target"]["a_pfs"][:, 0] += 100 - first  # no one is followed for less than 100
    km = plots.kaplan_meier_by_risk(report, predictions)
    for ax in km.axes:
        for line in ax.lines:
            assert (line.get_xdata()[0], line.get_ydata()[0]) == (0.0, 1.0)
        assert ax.get_xlim()[0] == 0
    assert [ax.get_xlabel() for ax in km.axes] == ["time (months)", "time (no time_unit declared)"]
    assert sorted(km.axes[0].lines[0].get_xdata())[1] >= 100  # the first step is the first event, at 100 or later


def test_folds_are_joined_and_missing_members_named(report, tmp_path):
    for fold in (0, 1):
        _write_sites(tmp_path / "sites" / f"fold{fold}", {"pharma-b": TASKS["pharma-b"]}, n=10)
    predictions = plots.read_site_predictions(tmp_path)
    assert set(predictions) == {"pharma-b"}
    assert predictions["pharma-b"]["prediction"]["b_pfs"].shape == (20,)
    assert predictions["pharma-b"]["target"]["b_pfs"].shape == (20, 2)
    assert predictions["pharma-b"]["fold"]["b_pfs"].tolist() == [0] * 10 + [1] * 10
    assert plots.missing_predictions(report, predictions, kind="survival") == ["pharma-a"]
    assert [ax.get_title() for ax in plots.kaplan_meier_by_risk(report, predictions).axes] == ["pharma-b: b_pfs"]


def test_save_report_plots_writes_the_pngs(report, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert {p.name for p in plots.save_report_plots(tmp_path)} == {
        "metrics.png",
        "learning_curves.png",
        "volcano.png",
        "effect_directions.png",
    }  # no site folders here: no ROC, no Kaplan-Meier; no regions: no forest plot (no figure that only says so)
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


def _without_survival(report: dict) -> dict:
    survival = [name for name, kind in KINDS.items() if kind == "survival"]
    for info in report["members"].values():
        info["tasks"] = {t: e for t, e in info["tasks"].items() if t not in survival}
    for section in (report["endpoints"], report["biomarkers"]["statistics"], report["biomarkers"]["model"]):
        for name in survival:
            del section[name]
    return report


def test_notebook_without_survival_endpoints_draws_no_empty_figure_and_writes_nothing_into_the_run(
    report, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(_without_survival(report)))
    _write_sites(run / "sites", {"pharma-a": ("a_response",), "pharma-b": ("a_response", "b_marker")})
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.delenv("CONSORTIUM_RUN_DIR", raising=False)
    executed = papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters=dict(run_dir=str(run), out_dir=str(tmp_path / "out"), top_features=5),
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # metric intervals, learning curves, volcano, effect directions, ROC: no Kaplan-Meier
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "survival endpoints" not in text and "survival:" not in text  # nor a line about them
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    scores = ad.read_h5ad(tmp_path / "out" / "biomarker_scores.h5ad")
    assert scores.var.loc[["G0", "G1"], "symbol"].tolist() == ["SYM0", ""]


def test_kaplan_meier_splits_each_fold_at_its_own_models_median(report, tmp_path):
    """A Cox score is defined up to a shift: fold 1's model scoring everyone 100 higher must not put the
    whole of fold 1 in the high-risk group."""
    for fold in (0, 1):
        _write_sites(tmp_path / "sites" / f"fold{fold}", {"pharma-b": TASKS["pharma-b"]}, n=10)
    predictions = plots.read_site_predictions(tmp_path)
    predictions["pharma-b"]["prediction"]["b_pfs"][10:] += 100.0
    predictions["pharma-b"]["target"]["b_pfs"][10:, 0] = 1000.0  # fold 1's follow-up, told apart by its time
    [ax] = plots.kaplan_meier_by_risk(report, predictions).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["low risk (n=10)", "high risk (n=10)"]
    for line in ax.lines:  # both groups hold samples of both folds
        times = set(line.get_xdata()) - {0.0}
        assert 1000.0 in times and len(times) > 1
