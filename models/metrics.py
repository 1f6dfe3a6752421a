"""Metrics per task kind, each on the non-missing labels, and :func:`evaluate` for a model.

All metrics are vectorized numpy. Each returns ``nan`` when it is undefined on the labels given
(one class only, fewer than two labels, constant targets, no comparable survival pair), so a
member with a thin split gets ``nan`` rather than an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from models.data import MemberData, TaskSpec
from models.network import MultitaskNet

logger = logging.getLogger(__name__)

PRIMARY_METRICS = {"binary": "auroc", "regression": "r2", "survival": "c_index"}
_PAIR_BLOCK = 1024  # rows per block of the O(n^2) C-index comparison, bounds memory


def _observed(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    if y.shape[0] != score.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {score.shape[0]} predictions")
    keep = ~np.isnan(y) if y.ndim == 1 else ~np.isnan(y).any(axis=1)
    return y[keep], score[keep]


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for tied scores)."""
    y, s = _observed(y_true, score)
    positives = y == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision: ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds."""
    y, s = _observed(y_true, score)
    n_pos = int((y == 1).sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # the last index of each run of equal scores is one threshold
    threshold_ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    true_pos = np.cumsum(y == 1)[threshold_ends]
    precision = true_pos / (threshold_ends + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def r2(y_true: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``."""
    y, p = _observed(y_true, prediction)
    if y.size < 2:
        return float("nan")
    total = np.sum((y - y.mean()) ** 2)
    if total == 0:
        return float("nan")
    return float(1.0 - np.sum((y - p) ** 2) / total)


def pearson_r(y_true: np.ndarray, prediction: np.ndarray) -> float:
    """Pearson correlation of labels and predictions."""
    y, p = _observed(y_true, prediction)
    if y.size < 2:
        return float("nan")
    dy, dp = y - y.mean(), p - p.mean()
    denominator = np.sqrt(np.sum(dy**2) * np.sum(dp**2))
    if denominator == 0:
        return float("nan")
    return float(np.clip(np.sum(dy * dp) / denominator, -1.0, 1.0))


def c_index(survival: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; higher ``risk`` should mean shorter survival.

    A pair ``(i, j)`` is comparable when ``i`` had an event and ``t_i < t_j``, or ``t_i == t_j``
    and ``j`` is censored (``i`` failed first). It is concordant when ``risk_i > risk_j``; tied
    risks count 1/2. Pairs where both failed at the same time are not comparable.

    Parameters
    ----------
    survival
        ``(n, 2)`` ``[time, event]``; rows with ``NaN`` are ignored.
    risk
        ``(n,)`` predicted risk (e.g. the Cox head's log-risk).
    """
    survival = np.asarray(survival, dtype=np.float64)
    if survival.ndim != 2 or survival.shape[1] != 2:
        raise ValueError(f"survival has shape {survival.shape}; expected (n, 2) [time, event]")
    y, r = _observed(survival, risk)
    time, event = y[:, 0], y[:, 1] == 1
    concordant = 0.0
    comparable = 0
    event_rows = np.flatnonzero(event)
    for start in range(0, event_rows.size, _PAIR_BLOCK):
        rows = event_rows[start : start + _PAIR_BLOCK]
        ti, ri = time[rows, None], r[rows, None]
        pairs = (ti < time[None, :]) | ((ti == time[None, :]) & ~event[None, :])
        comparable += int(pairs.sum())
        concordant += float(np.sum(pairs & (ri > r[None, :])) + 0.5 * np.sum(pairs & (ri == r[None, :])))
    if comparable == 0:
        return float("nan")
    return concordant / comparable


METRICS = {
    "binary": {"auroc": auroc, "auprc": auprc},
    "regression": {"r2": r2, "pearson_r": pearson_r},
    "survival": {"c_index": c_index},
}


def primary_metric(kind: str) -> str:
    """The metric a task kind is judged by: ``"auroc"``, ``"r2"`` or ``"c_index"``."""
    if kind not in PRIMARY_METRICS:
        raise ValueError(f"unknown task kind '{kind}'; use one of {sorted(PRIMARY_METRICS)}")
    return PRIMARY_METRICS[kind]


def task_metrics(kind: str, y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """All metrics of a task kind on one task's labels and predictions."""
    if kind not in METRICS:
        raise ValueError(f"unknown task kind '{kind}'; use one of {sorted(METRICS)}")
    return {name: fn(y_true, prediction) for name, fn in METRICS[kind].items()}


def evaluate(
    model: MultitaskNet, data: MemberData, tasks: Sequence[TaskSpec], *, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Metrics per task on one split of a member's data.

    Parameters
    ----------
    model
        The (unwrapped) network; regression predictions come back in original units through the
        head's stored train-split scaling (R2 and Pearson do not depend on it anyway).
    data
        The member's samples.
    tasks
        The tasks to score; each needs a head in ``model`` and labels in ``data.targets``.
    split
        ``"train"``, ``"val"`` or ``"test"``.

    Returns
    -------
    dict
        ``{task name: {metric name: value}}``; ``nan`` where a metric is undefined on the split.
    """
    part = data.subset(split)
    missing = [t.name for t in tasks if t.name not in part.targets]
    if missing:
        raise KeyError(f"evaluate: data has no labels for tasks {missing}; it has {sorted(part.targets)}")
    predictions = model.predict(part.X)
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        results[task.name] = task_metrics(task.kind, part.targets[task.name], predictions[task.name])
        if all(np.isnan(v) for v in results[task.name].values()):
            logger.info("task '%s': too few labels in split '%s' to score; metrics are nan", task.name, split)
    return results
