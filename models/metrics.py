"""Metrics per task kind, each on the non-missing labels, and :func:`evaluate` for a model.

The numerics come from scikit-learn (AUROC, average precision, R2, Brier), scipy (Pearson, Spearman),
statsmodels (the calibration slope) and scikit-survival (Harrell's C); a binary prediction is a logit.
Each metric returns ``nan`` when it is undefined on the labels given (one class only, fewer than two
labels, constant targets, no comparable survival pair) or when a prediction for a labelled sample is not
finite (a diverged model), so a member with a thin split gets ``nan`` rather than an exception.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import expit
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, brier_score_loss, r2_score, roc_auc_score

from models.data import MemberData, TaskSpec
from models.network import MultitaskNet

logger = logging.getLogger(__name__)

PRIMARY_METRICS = {"binary": "auroc", "regression": "r2", "survival": "c_index"}


def _observed(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    if y.shape[0] != score.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {score.shape[0]} predictions")
    keep = ~np.isnan(y) if y.ndim == 1 else ~np.isnan(y).any(axis=1)
    return y[keep], score[keep]


def _finite(score: np.ndarray) -> bool:
    if np.isfinite(score).all():
        return True
    n_bad = int((~np.isfinite(score)).sum())
    logger.warning("%d of %d predictions are not finite; the metric is nan", n_bad, score.size)
    return False


def _both_classes(y: np.ndarray) -> bool:
    n_pos = int((y == 1).sum())
    return 0 < n_pos < y.size


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`); tied scores count 1/2.

    Labels equal to 1 are positives, every other observed label is a negative.
    """
    y, s = _observed(y_true, score)
    if not _both_classes(y) or not _finite(s):
        return float("nan")
    return float(roc_auc_score(y == 1, s))


def auprc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision (:func:`sklearn.metrics.average_precision_score`), ``sum_k (R_k - R_{k-1}) P_k``."""
    y, s = _observed(y_true, score)
    if not _both_classes(y) or not _finite(s):
        return float("nan")
    return float(average_precision_score(y == 1, s))


def r2(y_true: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (:func:`sklearn.metrics.r2_score`)."""
    y, p = _observed(y_true, prediction)
    if y.size < 2 or np.ptp(y) == 0 or not _finite(p):
        return float("nan")
    return float(r2_score(y, p))


def pearson_r(y_true: np.ndarray, prediction: np.ndarray) -> float:
    """Pearson correlation of labels and predictions (:func:`scipy.stats.pearsonr`)."""
    y, p = _observed(y_true, prediction)
    if y.size < 2 or not _finite(p) or np.ptp(y) == 0 or np.ptp(p) == 0:
        return float("nan")
    return float(pearsonr(y, p).statistic)


def _concordance_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[int, int, int]:
    """``(concordant, discordant, tied_risk)`` pair counts; zeros when no pair is comparable."""
    if time.size < 2 or not event.any():
        return 0, 0, 0
    # scikit-survival is imported here: a member process without a survival endpoint never loads it
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    try:
        # events tied in time leave sksurv a 0/0 C-index; only its pair counts are used here
        with np.errstate(invalid="ignore", divide="ignore"):
            _, concordant, discordant, tied_risk, _ = concordance_index_censored(event, time, risk)
    except NoComparablePairException:
        return 0, 0, 0
    return int(concordant), int(discordant), int(tied_risk)


def c_index(survival: np.ndarray, risk: np.ndarray, *, strata: np.ndarray | None = None) -> float:
    """Harrell's concordance index (:func:`sksurv.metrics.concordance_index_censored`).

    Higher ``risk`` should mean shorter survival. A pair ``(i, j)`` is comparable when ``i`` had an
    event and ``t_i < t_j``, or ``t_i == t_j`` and ``j`` is censored. It is concordant when
    ``risk_i > risk_j``; risks within ``1e-8`` count 1/2. Pairs where both failed at the same time
    are not comparable.

    Parameters
    ----------
    survival
        ``(n, 2)`` ``[time, event]``; rows with ``NaN`` are ignored.
    risk
        ``(n,)`` predicted risk (e.g. the Cox head's log-risk).
    strata
        Optional ``(n,)`` group labels (e.g. the member of each sample). When given, only pairs
        within the same stratum are compared: concordant and comparable pairs are summed over the
        strata, so members with different baseline hazards are not ranked against each other.

    Returns
    -------
    float
        The C-index in ``[0, 1]``, or ``nan`` when no pair is comparable.
    """
    survival = np.asarray(survival, dtype=np.float64)
    if survival.ndim != 2 or survival.shape[1] != 2:
        raise ValueError(f"survival has shape {survival.shape}; expected (n, 2) [time, event]")
    n = survival.shape[0]
    groups = np.zeros(n, dtype=np.intp)
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ValueError(f"strata has shape {strata.shape}; expected ({n},), one label per sample")
        groups = np.unique(strata, return_inverse=True)[1].reshape(n)
    keep = ~np.isnan(survival).any(axis=1)
    y, r = _observed(survival, risk)
    if not _finite(r):
        return float("nan")
    groups = groups[keep]
    time, event = y[:, 0], y[:, 1] == 1
    concordant = discordant = tied_risk = 0
    for group in np.unique(groups):
        rows = groups == group
        c, d, t = _concordance_counts(time[rows], event[rows], r[rows])
        concordant, discordant, tied_risk = concordant + c, discordant + d, tied_risk + t
    comparable = concordant + discordant + tied_risk
    if comparable == 0:
        return float("nan")
    return (concordant + 0.5 * tied_risk) / comparable


def spearman_r(y_true: np.ndarray, prediction: np.ndarray) -> float:
    """Spearman rank correlation of labels and predictions (:func:`scipy.stats.spearmanr`): how well the
    predictions order the samples (ranking candidate sites), whatever their scale."""
    y, p = _observed(y_true, prediction)
    if y.size < 2 or not _finite(p) or np.ptp(y) == 0 or np.ptp(p) == 0:
        return float("nan")
    return float(spearmanr(y, p).statistic)


MIN_CALIBRATION_LABELS = 20
"""Fewer labelled samples (or fewer than 5 of a class) give no calibration slope: the fit would be noise."""


def brier(y_true: np.ndarray, logit: np.ndarray) -> float:
    """Brier score of the predicted probabilities ``sigmoid(logit)`` (:func:`sklearn.metrics.brier_score_loss`):
    the mean squared distance to the 0/1 labels, lower is better (0.25 for a constant 0.5)."""
    y, s = _observed(y_true, logit)
    if y.size == 0 or not _finite(s):
        return float("nan")
    return float(brier_score_loss(y == 1, expit(s)))


def calibration_in_the_large(y_true: np.ndarray, logit: np.ndarray) -> float:
    """Observed minus predicted event rate (``mean(y) - mean(sigmoid(logit))``): 0 when the model's
    probabilities are right on average; positive when it under-predicts."""
    y, s = _observed(y_true, logit)
    if y.size == 0 or not _finite(s):
        return float("nan")
    return float(np.mean(y == 1) - np.mean(expit(s)))


def calibration_slope(y_true: np.ndarray, logit: np.ndarray) -> float:
    """The slope of the logistic recalibration ``logit P(y=1) = a + b * logit`` (statsmodels ``Logit``,
    unpenalized): 1 for calibrated probabilities, below 1 when they are too extreme (overfitting), above 1
    when too timid. ``nan`` with fewer than :data:`MIN_CALIBRATION_LABELS` labels, fewer than 5 of a class,
    or a fit that does not converge (the labels separated by the logit)."""
    # imported where used (a member without a binary endpoint never loads it), and the model's own module,
    # not statsmodels.api (which loads all of it, time series and scipy.signal included: ~25 MB more)
    from statsmodels.discrete.discrete_model import Logit
    from statsmodels.tools.sm_exceptions import PerfectSeparationError, PerfectSeparationWarning
    from statsmodels.tools.tools import add_constant

    y, s = _observed(y_true, logit)
    positives = int((y == 1).sum())
    if y.size < MIN_CALIBRATION_LABELS or min(positives, y.size - positives) < 5 or not _finite(s):
        return float("nan")
    if np.ptp(s) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        try:
            fit = Logit((y == 1).astype(float), add_constant(s, has_constant="add")).fit(disp=0, maxiter=100)
        except (PerfectSeparationError, PerfectSeparationWarning, np.linalg.LinAlgError):
            return float("nan")
    if not fit.mle_retvals.get("converged", False):
        return float("nan")
    return float(fit.params[1])


METRICS = {
    "binary": {
        "auroc": auroc,
        "auprc": auprc,
        "brier": brier,
        "calibration_slope": calibration_slope,
        "calibration_in_the_large": calibration_in_the_large,
    },
    "regression": {"r2": r2, "pearson_r": pearson_r, "spearman_r": spearman_r},
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
