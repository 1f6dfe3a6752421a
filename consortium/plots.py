"""The plots researchers expect from a run, as matplotlib figures, and the PNGs written beside the report.

Every function takes the report (``report.json`` as a dict) and, where it needs per-sample data, the
members' test predictions (:func:`read_site_predictions`); it returns a :class:`~matplotlib.figure.Figure`
built without pyplot (no global state, no display), so the same code serves the notebook and
:func:`save_report_plots`. What a plot needs and the run folder does not hold (a member's
``predictions.npz`` stays at the member in production) is left out and named by :func:`missing_predictions`;
a plot with nothing to show is a figure holding that sentence and no axes (:func:`is_message`), and it is
not saved. Members appear in config order, features by gene symbol where the report has one, legends sit
outside the data. The biomarker plots are in :mod:`consortium.plots_biomarkers`, the per-sample ones in
:mod:`consortium.plots_samples`; both are importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from consortium.plots_biomarkers import effect_directions, region_forest, statistics_tables, volcano
from consortium.plots_common import METRIC_NAMES, grid, is_message, legend_below, message, symbols
from consortium.plots_samples import (
    Predictions,
    kaplan_meier_by_risk,
    missing_predictions,
    prediction_panels,
    read_site_predictions,
    roc_curves,
)
from schema.writes import writing

log = logging.getLogger(__name__)

__all__ = [
    "ARMS",
    "PLOTS_DIR",
    "effect_directions",
    "is_message",
    "kaplan_meier_by_risk",
    "learning_curves",
    "metric_intervals",
    "missing_predictions",
    "prediction_panels",
    "read_site_predictions",
    "region_forest",
    "report_figures",
    "roc_curves",
    "save_report_plots",
    "statistics_tables",
    "symbols",
    "volcano",
]

PLOTS_DIR = "plots"
ARMS = ("federated", "local", "pooled", "linear_local", "linear_pooled")
PRIMARY = {"binary": "auroc", "regression": "r2", "survival": "c_index"}
BOUNDS = {"auroc": (0.0, 1.0), "c_index": (0.0, 1.0), "r2": (None, 1.0)}
CHANCE = {"auroc": 0.5, "c_index": 0.5, "r2": 0.0}


# ----------------------------------------------------------------------------------------------- metrics


def _interval(entry: Mapping[str, Any], arm: str) -> tuple[float, float, float]:
    """An arm's test figure and its 95% interval; NaN where the report has none."""
    low, high = (entry.get("ci") or {}).get(arm) or (None, None)
    value, low, high = (np.nan if v is None else float(v) for v in (entry.get(arm), low, high))
    return value, low, high


def metric_intervals(report: Mapping[str, Any], *, arms: Sequence[str] = ARMS) -> Figure:
    """Per member and endpoint (members in config order), each arm's test metric as a dot with its 95%
    interval; one axes per metric, its axis spanning the intervals (not from 0), the arms' legend below."""
    rows = [
        (member, task, entry)
        for member, info in report["members"].items()
        for task, entry in info["tasks"].items()
        if any(entry.get(arm) is not None for arm in arms)
    ]
    metrics = list(dict.fromkeys(entry["metric"] for _, _, entry in rows))
    if not metrics:
        return message("no test figures in this report")
    present = [arm for arm in arms if any(e.get(arm) is not None for _, _, e in rows)]
    most = max(sum(e["metric"] == m for _, _, e in rows) for m in metrics)
    fig, axes = grid(len(metrics), size=(4.4, 0.22 * most * len(present) + 0.35 * most + 1.4))
    step = 0.8 / len(present)
    for ax, metric in zip(axes, metrics, strict=True):
        group = [(m, t, e) for m, t, e in rows if e["metric"] == metric]
        for k in range(0, len(group), 2):
            ax.axhspan(k - 0.5, k + 0.5, color="0.95", lw=0, zorder=0)  # every other row shaded
        for i, arm in enumerate(present):
            value, low, high = np.array([_interval(e, arm) for _, _, e in group]).T
            y = np.arange(len(group)) - 0.4 + (i + 0.5) * step
            xerr = np.nan_to_num(np.clip([value - low, high - value], 0, None))
            ax.errorbar(value, y, xerr=xerr, fmt="o", ms=4, capsize=2, lw=1.2, color=f"C{i}", label=arm)
        ends = np.array([_interval(e, a) for _, _, e in group for a in present], dtype=float)
        _span(ax, metric, ends[np.isfinite(ends)])
        ax.set_yticks(range(len(group)), [f"{m}\n{t}" for m, t, _ in group], fontsize=8)
        ax.set_ylim(len(group) - 0.5, -0.5)  # the first member on top
        name = METRIC_NAMES.get(metric, metric)
        ax.set(xlabel=f"test {name}", title=f"{name}: 95% bootstrap intervals")
        ax.title.set_fontsize(10)
        ax.grid(axis="x", color="0.85", lw=0.6)
    handles = [Line2D([], [], color=f"C{i}", marker="o", ms=4, label=arm) for i, arm in enumerate(present)]
    legend_below(fig, handles, title="arm")
    return fig


def _span(ax, metric: str, values: np.ndarray) -> None:
    """The x range of one metric: the intervals with a margin, inside the metric's bounds; the chance
    level drawn when it lies in that range."""
    if not values.size:
        return
    low, high = float(values.min()), float(values.max())
    margin = max(0.02, 0.08 * (high - low))
    floor, ceiling = BOUNDS.get(metric, (None, None))
    left = low - margin if floor is None else max(floor, low - margin)
    right = high + margin if ceiling is None else min(ceiling + 0.005, high + margin)
    ax.set_xlim(left, right)
    chance = CHANCE.get(metric)
    if chance is not None and left <= chance <= right:
        ax.axvline(chance, color="gray", lw=0.8, ls=":")


def _members_in_order(report: Mapping[str, Any]) -> list[str]:
    """The members with per-round records: in the report's (config) order, then any it does not list."""
    seen = {site for r in report.get("rounds") or [] for site in r.get("sites", {})}
    return [m for m in report["members"] if m in seen] + sorted(seen - set(report["members"]))


def learning_curves(report: Mapping[str, Any]) -> Figure:
    """Per member (config order), each endpoint's validation metric per round; and every member's training
    loss."""
    rounds = report.get("rounds") or []
    members = _members_in_order(report)
    if not members:
        return message("no per-round records in this report")
    fig, axes = grid(len(members) + 1, size=(4.0, 3.6))
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
                label = f"{task} {METRIC_NAMES.get(metric, metric)}"
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
        ax.set(title=f"{member}: validation", xlabel="round", ylabel="metric")
        _legend_under(ax)
    loss = axes[-1]
    for member in members:
        points = [(r["round"], (r["sites"].get(member) or {}).get("train_loss")) for r in rounds]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            loss.plot(*zip(*points, strict=True), marker="o", ms=3, label=member)
    loss.set(title="training loss", xlabel="round", ylabel="loss")
    _legend_under(loss)
    return fig


def _legend_under(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)


# ------------------------------------------------------------------------------------------------ saving


def report_figures(
    report: Mapping[str, Any], predictions: Predictions, *, statistics: Mapping[str, pd.DataFrame] | None = None
) -> dict[str, Figure]:
    """Every plot this report and these predictions allow, by file stem (none that would only say that
    there is nothing to show)."""
    figures = {
        "metrics": metric_intervals(report),
        "learning_curves": learning_curves(report),
        "volcano": volcano(report, statistics=statistics),
        "effect_directions": effect_directions(report),
        "forest_by_region": region_forest(report),
    }
    if prediction_panels(report, predictions, "binary"):
        figures["roc"] = roc_curves(report, predictions)
    if prediction_panels(report, predictions, "survival"):
        figures["kaplan_meier"] = kaplan_meier_by_risk(report, predictions)
    for stem, figure in list(figures.items()):
        if is_message(figure):
            log.info("no %s plot: %s", stem, figure.texts[0].get_text())
            del figures[stem]
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
