"""The plots researchers expect from a run, as matplotlib figures, and the PNGs written beside the report.

Every function takes the report (``report.json`` as a dict) and, where it needs per-sample data, the
members' test predictions (:func:`read_site_predictions`); it returns a :class:`~matplotlib.figure.Figure`
built without pyplot (no global state, no display), so the same code serves the notebook and
:func:`save_report_plots`. What a plot needs and the run folder does not hold (a member's
``predictions.npz`` stays at the member in production) is left out and named by :func:`missing_predictions`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from sksurv.compare import compare_survival
from sksurv.nonparametric import kaplan_meier_estimator

from jobs.site_outputs import PREDICTIONS_FILE, read_predictions
from omics.statistics import EFFECT, uniform_columns
from schema.writes import writing

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
ARMS = ("federated", "local", "pooled", "linear_local", "linear_pooled")
PRIMARY = {"binary": "auroc", "regression": "r2", "survival": "c_index"}
Predictions = Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]


def _grid(panels: int, *, ncols: int = 3, size: tuple[float, float] = (4.0, 3.4)) -> tuple[Figure, list]:
    """A figure with exactly ``panels`` axes (unused grid cells removed)."""
    ncols = max(1, min(ncols, panels))
    nrows = max(1, math.ceil(panels / ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for extra in axes[panels:]:
        fig.delaxes(extra)
    return fig, axes[:panels]


def _empty(message: str) -> Figure:
    fig = Figure(figsize=(5, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


# ----------------------------------------------------------------------------------------------- metrics


def metric_bars(report: Mapping[str, Any], *, arms: Sequence[str] = ARMS) -> Figure:
    """Per member and endpoint, each arm's test metric with its 95% interval; one axes per metric."""
    rows = [
        (member, task, entry)
        for member, info in report["members"].items()
        for task, entry in info["tasks"].items()
        if any(entry.get(arm) is not None for arm in arms)
    ]
    metrics = list(dict.fromkeys(entry["metric"] for _, _, entry in rows))
    if not metrics:
        return _empty("no test figures in this report")
    fig, axes = _grid(len(metrics), ncols=len(metrics), size=(max(4.0, 0.9 * len(rows) / len(metrics) + 2), 4.0))
    for ax, metric in zip(axes, metrics, strict=True):
        group = [(m, t, e) for m, t, e in rows if e["metric"] == metric]
        present = [arm for arm in arms if any(e.get(arm) is not None for _, _, e in group)]
        width = 0.8 / len(present)
        x = np.arange(len(group))
        for i, arm in enumerate(present):
            values = np.array([np.nan if e.get(arm) is None else e[arm] for _, _, e in group], dtype=float)
            ci = [(e.get("ci") or {}).get(arm) or [None, None] for _, _, e in group]
            low = np.array([np.nan if c[0] is None else c[0] for c in ci], dtype=float)
            high = np.array([np.nan if c[1] is None else c[1] for c in ci], dtype=float)
            yerr = np.nan_to_num(np.clip([values - low, high - values], 0, None))
            ax.bar(x + (i - (len(present) - 1) / 2) * width, values, width, yerr=yerr, capsize=2, label=arm)
        ax.set_xticks(x, [f"{m}\n{t}" for m, t, _ in group], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{metric}: 95% bootstrap intervals", fontsize=10)
        if metric in ("auroc", "c_index"):
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    return fig


def learning_curves(report: Mapping[str, Any]) -> Figure:
    """Per member, each endpoint's validation metric per round; and every member's training loss."""
    rounds = report.get("rounds") or []
    members = list(dict.fromkeys(site for r in rounds for site in r.get("sites", {})))
    if not members:
        return _empty("no per-round records in this report")
    fig, axes = _grid(len(members) + 1)
    for ax, member in zip(axes, members, strict=False):
        tasks = report["members"].get(member, {}).get("tasks", {})
        for task, entry in tasks.items():
            metric = entry.get("metric") or PRIMARY.get(entry.get("type"), "")
            points = [
                (r["round"], ((r["sites"].get(member) or {}).get("val") or {}).get(task, {}).get(metric))
                for r in rounds
            ]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=f"{task} {metric}")
        ax.set(title=f"{member}: validation", xlabel="round", ylabel="metric")
        ax.legend(fontsize=7)
    loss = axes[-1]
    for member in members:
        points = [(r["round"], (r["sites"].get(member) or {}).get("train_loss")) for r in rounds]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            loss.plot(*zip(*points, strict=True), marker="o", ms=3, label=member)
    loss.set(title="training loss", xlabel="round", ylabel="loss")
    loss.legend(fontsize=7)
    return fig


# -------------------------------------------------------------------------------------------- biomarkers


def statistics_tables(report: Mapping[str, Any], run_dir: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Each endpoint's association statistics: the full table from ``<run>/biomarkers/`` when given and
    present, else the top features ``report.json`` keeps."""
    tables = {}
    for name, rows in report["biomarkers"]["statistics"].items():
        kept = pd.DataFrame(rows)
        path = Path(run_dir) / "biomarkers" / f"statistics_{name}.csv" if run_dir is not None else None
        full = pd.read_csv(path) if path is not None and path.exists() else None
        # the report keeps the table's head: a table that does not start with it is another run's
        head = [] if full is None else list(full["feature"].astype(str).head(len(kept)))
        same_run = full is not None and head == [r["feature"] for r in rows]
        tables[name] = full if same_run else kept
    return tables


def volcano(
    report: Mapping[str, Any],
    *,
    statistics: Mapping[str, pd.DataFrame] | None = None,
    q_threshold: float = 0.05,
    label_top: int = 5,
) -> Figure:
    """Effect against -log10 p per endpoint; q below the threshold in colour, planted features ringed."""
    tables = dict(statistics) if statistics is not None else statistics_tables(report)
    tables = {name: table for name, table in tables.items() if len(table)}
    if not tables:
        return _empty("no association statistics in this report")
    planted = report["biomarkers"].get("ground_truth") or {}
    fig, axes = _grid(len(tables))
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        kind = report["endpoints"].get(name, {}).get("type", "binary")
        table = table.rename(columns={v: k for k, v in uniform_columns(kind).items()})
        effect = table["effect"].to_numpy(float)
        height = -np.log10(table["pvalue"].clip(lower=1e-300).to_numpy(float))
        hit = table["qvalue"].to_numpy(float) < q_threshold
        colors = np.where(hit, np.where(effect > 0, "tab:red", "tab:blue"), "lightgray")
        ax.scatter(effect, height, s=8, c=colors, linewidths=0)
        truth = table["feature"].isin(planted.get(name, [])).to_numpy()
        if truth.any():
            ax.scatter(
                effect[truth], height[truth], s=30, facecolors="none", edgecolors="black", lw=0.7, label="planted"
            )
            ax.legend(fontsize=7, loc="best")
        for row in table.nsmallest(label_top, "pvalue").itertuples():
            ax.annotate(str(row.feature), (row.effect, -np.log10(max(row.pvalue, 1e-300))), fontsize=6)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set(title=f"{name} ({kind}), {len(table)} features", xlabel=EFFECT[kind], ylabel="-log10 p")
    return fig


def region_forest(report: Mapping[str, Any], *, top: int = 6) -> Figure:
    """Per endpoint analysed by region, the top features' effect in every region with its 95% interval,
    and the interaction p and I² beside each feature (``statistics.by: region``)."""
    entries = {
        name: entry
        for name, entry in report["biomarkers"].get("statistics_release", {}).items()
        if entry.get("regions")
    }
    if not entries:
        return _empty("no subgroups by region in this report (statistics.by: region)")
    fig, axes = _grid(len(entries), ncols=2, size=(6.0, 0.55 * top * 2 + 1.5))
    for ax, (name, entry) in zip(axes, entries.items(), strict=True):
        head = [row["feature"] for row in report["biomarkers"]["statistics"].get(name, [])[:top]]
        rows = pd.DataFrame(entry["regions"])
        rows = rows[rows["feature"].isin(head)]
        regions = list(dict.fromkeys(rows["region"]))
        stats = {r["feature"]: r for r in report["biomarkers"]["statistics"][name][:top]}
        height = len(regions) + 1
        ticks, labels = [], []
        for i, feature in enumerate(head):
            for j, region in enumerate(regions):
                match = rows[(rows["feature"] == feature) & (rows["region"] == region)]
                if match.empty:
                    continue
                row = match.iloc[0]
                y = -(i * height + j)
                ax.errorbar(
                    [row["effect"]],
                    [y],
                    xerr=[[row["effect"] - row["ci_low"]], [row["ci_high"] - row["effect"]]],
                    fmt="o",
                    ms=4,
                    color=f"C{j}",
                    label=region if i == 0 else None,
                )
            info = stats.get(feature, {})
            ticks.append(-(i * height + (len(regions) - 1) / 2))
            labels.append(f"{feature}\np(int) {_fmt_p(info.get('interaction_p'))}, I² {_fmt_pct(info.get('I2'))}")
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_yticks(ticks, labels=labels, fontsize=7)
        kind = report["endpoints"].get(name, {}).get("type", "binary")
        ax.set(title=f"{name}: effect by region (95% CI)", xlabel=EFFECT.get(kind, "effect"))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="region", title_fontsize=7)
    return fig


def _fmt_p(value) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _fmt_pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def effect_directions(report: Mapping[str, Any], *, top: int = 10) -> Figure:
    """Per endpoint, the model's top features by attribution, signed by their direction (up: red)."""
    rankings = {name: pd.DataFrame(rows) for name, rows in report["biomarkers"].get("model", {}).items() if rows}
    if not rankings:
        return _empty("no model rankings in this report")
    fig, axes = _grid(len(rankings), size=(4.0, 0.25 * top + 1.2))
    for ax, (name, table) in zip(axes, rankings.items(), strict=True):
        head = table.sort_values("rank").head(top).iloc[::-1]
        signed = (head["score"] * head.get("direction", 1)).to_numpy(float)
        ax.barh(head["feature"].astype(str), signed, color=np.where(signed > 0, "tab:red", "tab:blue"))
        ax.axvline(0, color="gray", lw=0.6)
        ax.tick_params(axis="y", labelsize=7)
        ax.set(title=f"{name}: model, signed", xlabel="attribution x direction")
    return fig


# ----------------------------------------------------------------------------- per-sample (members' files)


def read_site_predictions(run_dir: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{member: {"prediction": {task: array}, "target": {task: array}}}`` from the sites' folders the run
    folder holds (``sites/<member>/`` or, with folds, ``sites/fold<k>/<member>/`` joined out of fold)."""
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for path in sorted(Path(run_dir, "sites").rglob(PREDICTIONS_FILE)):
        member = path.parent.name
        arrays = read_predictions(path.parent)
        mine = found.setdefault(member, {"prediction": {}, "target": {}})
        for kind, tasks in arrays.items():
            for task, values in tasks.items():
                mine[kind][task] = np.concatenate([mine[kind][task], values]) if task in mine[kind] else values
    return found


def missing_predictions(report: Mapping[str, Any], predictions: Predictions, *, kind: str) -> list[str]:
    """The members holding a ``kind`` endpoint whose predictions this run folder does not have."""
    holders = {
        member
        for member, info in report["members"].items()
        for entry in info["tasks"].values()
        if entry.get("type") == kind
    }
    return sorted(holders - set(predictions))


def _panels(report: Mapping[str, Any], predictions: Predictions, kind: str) -> list[tuple[str, str]]:
    return [
        (member, task)
        for member, info in report["members"].items()
        for task, entry in info["tasks"].items()
        if entry.get("type") == kind and task in (predictions.get(member) or {}).get("prediction", {})
    ]


def roc_curves(report: Mapping[str, Any], predictions: Predictions) -> Figure:
    """ROC of the federated model on each member's binary endpoints (its own test samples)."""
    panels = _panels(report, predictions, "binary")
    if not panels:
        return _empty("no predictions for binary endpoints in this run folder")
    fig, axes = _grid(len(panels), size=(3.6, 3.4))
    for ax, (member, task) in zip(axes, panels, strict=True):
        y = np.asarray(predictions[member]["target"][task], dtype=float)
        score = np.asarray(predictions[member]["prediction"][task], dtype=float)
        keep = np.isfinite(y) & np.isfinite(score)
        y, score = y[keep], score[keep]
        if np.unique(y).size == 2:
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(y, score):.3f} (n={y.size})")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="chance")
        ax.set(title=f"{member}: {task}", xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
        ax.legend(fontsize=7, loc="lower right")
    return fig


def kaplan_meier_by_risk(report: Mapping[str, Any], predictions: Predictions) -> Figure:
    """Kaplan-Meier curves (95% bands) of each member's survival endpoints, test samples split at the
    median predicted risk; the log-rank p between the two groups in the legend title."""
    panels = _panels(report, predictions, "survival")
    if not panels:
        return _empty("no predictions for survival endpoints in this run folder")
    fig, axes = _grid(len(panels), size=(3.8, 3.4))
    for ax, (member, task) in zip(axes, panels, strict=True):
        survival = np.asarray(predictions[member]["target"][task], dtype=float)
        risk = np.asarray(predictions[member]["prediction"][task], dtype=float)
        keep = np.isfinite(survival).all(axis=1) & np.isfinite(risk)
        time, event, risk = survival[keep, 0], survival[keep, 1].astype(bool), risk[keep]
        high = risk > np.median(risk)
        title = None
        if event.any() and 0 < high.sum() < high.size:
            groups = np.where(high, "high", "low")
            structured = np.array(list(zip(event, time, strict=True)), dtype=[("event", bool), ("time", float)])
            _, pvalue = compare_survival(structured, groups)
            title = f"log-rank p={pvalue:.2g}"
        for mask, label, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
            if not mask.any():
                continue
            steps, surv, (low, up) = kaplan_meier_estimator(event[mask], time[mask], conf_type="log-log")
            ax.step(steps, surv, where="post", color=color, label=f"{label} (n={mask.sum()})")
            ax.fill_between(steps, low, up, step="post", color=color, alpha=0.15, lw=0)
        ax.set(title=f"{member}: {task}", xlabel="time", ylabel="survival probability", ylim=(0, 1.02))
        ax.legend(fontsize=7, title=title, title_fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------------ saving


def report_figures(
    report: Mapping[str, Any], predictions: Predictions, *, statistics: Mapping[str, pd.DataFrame] | None = None
) -> dict[str, Figure]:
    """Every plot this report and these predictions allow, by file stem."""
    figures = {
        "metrics": metric_bars(report),
        "learning_curves": learning_curves(report),
        "volcano": volcano(report, statistics=statistics),
        "effect_directions": effect_directions(report),
    }
    if any(e.get("regions") for e in report["biomarkers"].get("statistics_release", {}).values()):
        figures["forest_by_region"] = region_forest(report)
    if _panels(report, predictions, "binary"):
        figures["roc"] = roc_curves(report, predictions)
    if _panels(report, predictions, "survival"):
        figures["kaplan_meier"] = kaplan_meier_by_risk(report, predictions)
    return figures


def save_report_plots(run_dir: str | Path, *, report: Mapping[str, Any] | None = None, dpi: int = 100) -> list[Path]:
    """Write the run's plots as PNGs under ``<run_dir>/plots/``; returns the paths written.

    Reads ``report.json`` (unless ``report`` is given, as that file holds it: NaN as ``None``), the
    sites' predictions the folder holds and, when present, the full statistics tables
    (``biomarkers/``); plots needing per-sample data are written only for the members whose predictions
    are here (the others are logged).
    """
    run_dir = Path(run_dir)
    report = report if report is not None else json.loads((run_dir / "report.json").read_text())
    predictions = read_site_predictions(run_dir)
    for kind in ("binary", "survival"):
        if missing := missing_predictions(report, predictions, kind=kind):
            log.info("no %s predictions in %s for %s: their %s plots are left out", kind, run_dir, missing, kind)
    folder = run_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    written = []
    for stem, figure in report_figures(report, predictions, statistics=statistics_tables(report, run_dir)).items():
        path = folder / f"{stem}.png"
        with writing(path) as temp:
            figure.savefig(temp, dpi=dpi)
        written.append(path)
    log.info("wrote %d plots to %s", len(written), folder)
    return written
