"""Percentile-bootstrap confidence intervals for a task's primary metric, alone or as a paired difference.

Samples are resampled with replacement; with ``strata`` (e.g. the member of each sample) they are
resampled within each stratum, so every stratum keeps its size in every resample. Resamples on
which the metric is undefined (one class only, constant targets, no comparable survival pair) are
skipped; when fewer than half of them are usable the interval is ``(nan, nan)``.

The point estimates come from :mod:`models.metrics`. The resamples are scored all at once, with
the same definitions in vectorized form (tests check them against :mod:`models.metrics` resample by
resample): AUROC by Mann-Whitney ranks along rows, R2 by sums of squares along rows, the C-index by
resample multiplicities against the original samples' comparable and concordant pair matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

from models.metrics import METRICS, c_index, primary_metric

logger = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 2_000_000  # array elements held at once per arm, bounds memory for large n
_TIED_RISK = 1e-8  # risks this close are tied, as in sksurv.metrics.concordance_index_censored


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval.

    Attributes
    ----------
    estimate
        The metric (or difference of metrics) on all labelled samples.
    low, high
        The percentile-bootstrap bounds; ``nan`` when fewer than half of the resamples were usable.
    n
        The number of labelled samples the estimate and the resamples are drawn from.
    """

    estimate: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """``{"estimate", "low", "high", "n"}`` as plain Python numbers (JSON-ready apart from ``nan``)."""
        return asdict(self)


def metric_interval(
    kind: str,
    y_true: np.ndarray,
    prediction: np.ndarray,
    *,
    strata: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap confidence interval of the primary metric of a task kind.

    Parameters
    ----------
    kind
        ``"binary"`` (AUROC), ``"regression"`` (R2) or ``"survival"`` (Harrell's C; within-stratum
        when ``strata`` are given).
    y_true
        ``(n,)`` labels, or ``(n, 2)`` ``[time, event]`` for survival; ``NaN`` rows are dropped.
    prediction
        ``(n,)`` score, value or risk.
    strata
        Optional ``(n,)`` group labels; resampling stays within each group.
    n_boot
        Number of bootstrap resamples.
    level
        Coverage of the interval, in ``(0, 1)``.
    seed
        Seed of the resampling.

    Returns
    -------
    Interval
        The metric on all labelled samples and its percentile interval.
    """
    y, (p,), groups = _labelled(kind, y_true, {"prediction": prediction}, strata)
    metric = _point_metric(kind, groups)
    values = _bootstrap(kind, y, (p,), groups, n_boot=n_boot, level=level, seed=seed)[:, 0]
    return _interval(metric(y, p), values, level=level, n=y.shape[0])


def paired_difference_interval(
    kind: str,
    y_true: np.ndarray,
    prediction_a: np.ndarray,
    prediction_b: np.ndarray,
    *,
    strata: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap confidence interval of ``metric(a) - metric(b)`` on the same samples.

    Both predictions are scored on the same resamples (a paired bootstrap), so the variation the
    two share cancels. Parameters as in :func:`metric_interval`; a resample counts when the
    metric is defined for both arms.

    Returns
    -------
    Interval
        ``metric(a) - metric(b)`` on all labelled samples and its percentile interval; an interval
        excluding 0 says ``a`` and ``b`` differ at that level.
    """
    y, (a, b), groups = _labelled(kind, y_true, {"prediction_a": prediction_a, "prediction_b": prediction_b}, strata)
    metric = _point_metric(kind, groups)
    values = _bootstrap(kind, y, (a, b), groups, n_boot=n_boot, level=level, seed=seed)
    return _interval(metric(y, a) - metric(y, b), values[:, 0] - values[:, 1], level=level, n=y.shape[0])


def _labelled(
    kind: str, y_true: np.ndarray, predictions: dict[str, np.ndarray], strata: np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Validate shapes and keep the labelled samples; strata come back as integer codes."""
    primary_metric(kind)  # raises on an unknown kind
    y = np.asarray(y_true, dtype=np.float64)
    expected = "(n, 2) [time, event]" if kind == "survival" else "(n,)"
    if (kind == "survival" and (y.ndim != 2 or y.shape[1] != 2)) or (kind != "survival" and y.ndim != 1):
        raise ValueError(f"y_true has shape {y.shape}; a {kind} task needs {expected}")
    n = y.shape[0]
    arrays = []
    for name, prediction in predictions.items():
        prediction = np.asarray(prediction, dtype=np.float64)
        if prediction.shape != (n,):
            raise ValueError(
                f"{name} has shape {prediction.shape} but y_true has {n} samples; pass one value per sample"
            )
        arrays.append(prediction)
    groups = np.zeros(n, dtype=np.intp)
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ValueError(f"strata has shape {strata.shape} but y_true has {n} samples; pass one label per sample")
        groups = np.unique(strata, return_inverse=True)[1].reshape(n)
    keep = ~np.isnan(y) if y.ndim == 1 else ~np.isnan(y).any(axis=1)
    return y[keep], [p[keep] for p in arrays], groups[keep]


def _point_metric(kind: str, groups: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    if kind == "survival":
        return lambda y, p: c_index(y, p, strata=groups)
    return METRICS[kind][primary_metric(kind)]


def _resample(groups: np.ndarray, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_rows, n)`` sample indices, each row a bootstrap resample within every group."""
    parts = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        parts.append(members[rng.integers(0, members.size, size=(n_rows, members.size))])
    return np.concatenate(parts, axis=1) if parts else np.empty((n_rows, 0), dtype=np.intp)


def _bootstrap(
    kind: str,
    y: np.ndarray,
    predictions: Sequence[np.ndarray],
    groups: np.ndarray,
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> np.ndarray:
    """``(n_boot, n_arms)`` metric values; every arm is scored on the same resamples."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot is {n_boot!r}; pass a positive integer such as 1000")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level is {level!r}; pass a coverage in (0, 1) such as 0.95")
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(1, y.shape[0]))
    values = np.empty((n_boot, len(predictions)))
    for start in range(0, n_boot, block):
        rows = _resample(groups, min(block, n_boot - start), rng)
        for arm, prediction in enumerate(predictions):
            values[start : start + rows.shape[0], arm] = _resampled_metric(kind, y, prediction, groups, rows)
    return values


def _resampled_metric(
    kind: str, y: np.ndarray, prediction: np.ndarray, groups: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    if not np.isfinite(prediction).all():
        return np.full(rows.shape[0], np.nan)  # as the point metric: a diverged model scores nan
    if kind == "binary":
        return _auroc_rows(y[rows] == 1, prediction[rows])
    if kind == "regression":
        return _r2_rows(y[rows], prediction[rows])
    return _c_index_rows(y, prediction, groups, rows)


def _auroc_rows(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC of each row by Mann-Whitney U with mid-ranks (tied scores count 1/2)."""
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    rank_sum = np.sum(rankdata(score, axis=1) * positive, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _r2_rows(y: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """R2 of each row; ``nan`` where the row's targets are constant."""
    total = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)
    residual = np.sum((y - prediction) ** 2, axis=1)
    constant = np.ptp(y, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(constant, np.nan, 1.0 - residual / np.where(constant, 1.0, total))


def _c_index_rows(survival: np.ndarray, risk: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Within-group Harrell's C of each resample, from pair matrices of the original samples.

    A resample holding sample ``i`` ``w_i`` times has ``sum_ij w_i w_j P_ij`` comparable pairs
    (``P_ii = 0``: a sample is never comparable to its copy), so one matrix product per block
    scores every resample; the pair rules are those of :func:`models.metrics.c_index`.
    """
    n_rows, n = rows.shape
    flat = (rows + n * np.arange(n_rows)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_rows * n).reshape(n_rows, n).astype(np.float64)
    time, event = survival[:, 0], survival[:, 1] == 1
    concordant, comparable = np.zeros(n_rows), np.zeros(n_rows)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        failed = members[event[members]]
        step = max(1, _BLOCK_ELEMENTS // max(1, failed.size))
        for start in range(0, members.size, step):
            other = members[start : start + step]
            earlier = time[failed, None] < time[None, other]
            tied_censored = (time[failed, None] == time[None, other]) & ~event[None, other]
            pairs = (earlier | tied_censored).astype(np.float64)
            gap = risk[failed, None] - risk[None, other]
            score = pairs * np.where(np.abs(gap) <= _TIED_RISK, 0.5, gap > 0)
            w_other = counts[:, other]
            comparable += np.sum((counts[:, failed] @ pairs) * w_other, axis=1)
            concordant += np.sum((counts[:, failed] @ score) * w_other, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(comparable > 0, concordant / comparable, np.nan)


def _interval(estimate: float, values: np.ndarray, *, level: float, n: int) -> Interval:
    usable = values[np.isfinite(values)]
    if usable.size < values.size / 2:
        logger.warning(
            "only %d of %d bootstrap resamples have a defined metric (n=%d); the interval is nan",
            usable.size,
            values.size,
            n,
        )
        return Interval(float(estimate), float("nan"), float("nan"), n)
    tail = (1.0 - level) / 2
    low, high = np.quantile(usable, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), n)


def bootstrap_metric_values(
    kind: str, y_true: np.ndarray, predictions: Sequence[np.ndarray], *, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """``(n_boot, len(predictions))`` primary-metric values of each prediction on the same resamples of the
    labelled samples (``nan`` where a resample leaves the metric undefined), for estimators built from
    several groups' metrics, such as the average of members' AUROC; :func:`percentile_interval` reads them."""
    named = {f"predictions[{i}]": p for i, p in enumerate(predictions)}
    y, arrays, groups = _labelled(kind, y_true, named, None)
    return _bootstrap(kind, y, arrays, groups, n_boot=n_boot, level=0.95, seed=seed)


def percentile_interval(estimate: float, values: np.ndarray, *, n: int, level: float = 0.95) -> Interval:
    """The percentile interval of bootstrap ``values`` around ``estimate``; ``nan`` bounds when fewer than
    half of the values are finite, as for :func:`metric_interval`."""
    return _interval(estimate, np.asarray(values, dtype=np.float64), level=level, n=n)
