"""The plots that need per-sample predictions (a member's ``predictions.npz``): ROC curves of binary
endpoints and Kaplan-Meier curves by predicted risk group of survival endpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from sksurv.compare import compare_survival
from sksurv.nonparametric import kaplan_meier_estimator

from consortium.plots_common import grid, message
from jobs.site_outputs import PREDICTIONS_FILE, read_predictions

Predictions = Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]


def read_site_predictions(run_dir: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{member: {"prediction": {task: array}, "target": {task: array}, "fold": {task: array}}}`` from the
    sites' folders the run folder holds (``sites/<member>/``, fold 0; or, with folds,
    ``sites/fold<k>/<member>/`` joined out of fold, each sample with the fold whose model scored it)."""
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for path in sorted(Path(run_dir, "sites").rglob(PREDICTIONS_FILE)):
        member, folder = path.parent.name, path.parent.parent.name
        fold = int(folder.removeprefix("fold")) if folder.startswith("fold") and folder[4:].isdigit() else 0
        arrays = read_predictions(path.parent)
        mine = found.setdefault(member, {"prediction": {}, "target": {}, "fold": {}})
        arrays["fold"] = {task: np.full(len(values), fold) for task, values in arrays["prediction"].items()}
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


def prediction_panels(report: Mapping[str, Any], predictions: Predictions, kind: str) -> list[tuple[str, str]]:
    """``(member, endpoint)`` of each ``kind`` endpoint whose predictions are here, members in config order."""
    return [
        (member, task)
        for member, info in report["members"].items()
        for task, entry in info["tasks"].items()
        if entry.get("type") == kind and task in (predictions.get(member) or {}).get("prediction", {})
    ]


def roc_curves(report: Mapping[str, Any], predictions: Predictions) -> Figure:
    """ROC of the federated model on each member's binary endpoints (its own test samples)."""
    panels = prediction_panels(report, predictions, "binary")
    if not panels:
        return message("no predictions for binary endpoints in this run folder")
    fig, axes = grid(len(panels), size=(3.6, 3.4))
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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    return fig


def time_label(report: Mapping[str, Any], endpoint: str) -> str:
    """The time axis of a survival endpoint: with the ``time_unit`` its members declared, else saying none was."""
    unit = report["endpoints"].get(endpoint, {}).get("time_unit")
    return f"time ({unit})" if unit else "time (no time_unit declared)"


def _from_zero(steps: np.ndarray, *curves: np.ndarray) -> tuple[np.ndarray, ...]:
    """A Kaplan-Meier step function that starts at time 0 with every curve at 1 (the estimator starts at
    the first observed time)."""
    if steps.size and steps[0] <= 0:
        return (steps, *curves)
    return (np.concatenate([[0.0], steps]), *(np.concatenate([[1.0], c]) for c in curves))


def _above_median(risk: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """High risk: above the median of the samples its own fold's model scored (each fold's risk scale is its
    own model's: a Cox score is defined up to a shift, so one median over all folds would split by fold)."""
    high = np.zeros(risk.size, dtype=bool)
    for fold in np.unique(folds):
        mine = folds == fold
        high[mine] = risk[mine] > np.median(risk[mine])
    return high


def kaplan_meier_by_risk(report: Mapping[str, Any], predictions: Predictions) -> Figure:
    """Kaplan-Meier curves (95% bands) of each member's survival endpoints from time 0, test samples split
    at the median predicted risk (within each fold, with folds); the log-rank p between the two groups in the
    legend title."""
    panels = prediction_panels(report, predictions, "survival")
    if not panels:
        return message("no predictions for survival endpoints in this run folder")
    fig, axes = grid(len(panels), size=(3.9, 3.9))
    for ax, (member, task) in zip(axes, panels, strict=True):
        survival = np.asarray(predictions[member]["target"][task], dtype=float)
        risk = np.asarray(predictions[member]["prediction"][task], dtype=float)
        folds = (predictions[member].get("fold") or {}).get(task, np.zeros(risk.size, dtype=int))
        keep = np.isfinite(survival).all(axis=1) & np.isfinite(risk)
        time, event, high = survival[keep, 0], survival[keep, 1].astype(bool), _above_median(risk[keep], folds[keep])
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
            steps, surv, low, up = _from_zero(steps, surv, low, up)
            ax.step(steps, surv, where="post", color=color, label=f"{label} (n={mask.sum()})")
            ax.fill_between(steps, low, up, step="post", color=color, alpha=0.15, lw=0)
        ax.set(title=f"{member}: {task}", xlabel=time_label(report, task), ylabel="survival probability")
        ax.set(ylim=(0, 1.02), xlim=(0, None))
        ax.legend(
            fontsize=7, title=title, title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2,
            frameon=False,
        )  # fmt: skip
    return fig
