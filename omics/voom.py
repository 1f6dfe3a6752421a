"""Federated voom (Law et al. 2014): observation-level precision weights for counts, from per-member sums.

limma's ``voom`` on the pooled counts with a member factor in the design is reproduced in two rounds,
each step a pure function so that every member computes the same:

1. members: :func:`site_voom_statistics` on their own counts -> the ordinary pieces of the log2-CPM
   (:data:`omics.linear_model.LINEAR_KEYS`) plus, per feature, ``log_library`` (the sum over the
   member's samples of ``log2(lib.size + 1)``) and ``detected`` (how many of its samples have a count);
   the server adds them;
   holder of the sum: :func:`voom_trend` -> the lowess trend of ``sqrt(sigma)`` on the mean log-count,
   and :func:`omics.linear_model.fit_linear_models` -> the unweighted fit; both are broadcast.
2. members: :func:`voom_fitted_values` (the broadcast fit on their own log2-CPM) -> :func:`voom_weights`
   -> :func:`site_weighted_statistics` (weighted least squares, member fixed effect); the server adds;
   holder: :func:`omics.linear_model.fit_linear_models` -> :func:`omics.ebayes.ebayes` -> ``top_table``.

What the holder computes equals limma's ``voom(counts, design, lib.size)`` + ``lmFit(weights=)`` +
``eBayes`` on the pooled data whose design has the member dummies:

- voom's preliminary ``lmFit`` is unweighted, so round 1 is the ordinary federated fit: ``sigma`` and
  ``Amean`` (the plain mean log2-CPM) are exact;
- ``sx = Amean + mean(log2(lib.size + 1)) - log2(1e6)``: the mean over the pooled samples of
  ``log2(lib.size + 1)`` is ``sum(log_library) / samples``;
- voom leaves the features without a count in any sample out of the lowess (``detected == 0``);
- the fitted values of the pooled fit with member dummies are, for a member's sample,
  ``mean_m(y) + (x - mean_m(x)) beta`` (least squares residuals sum to zero within each member), which the
  member computes from the broadcast ``beta``.

``lowess`` is R's ``stats::lowess`` (the ``clowess`` algorithm, ported in :func:`lowess`), which voom
calls with ``f = span = 0.5``, ``iter = 3`` and ``delta = 0.01 * diff(range(sx))``.

References
----------
Law, C. W., Chen, Y., Shi, W. and Smyth, G. K. (2014). voom: precision weights unlock linear model
analysis tools for RNA-seq read counts. Genome Biology 15, R29.
Cleveland, W. S. (1979). Robust locally weighted regression and smoothing scatterplots. JASA 74, 829-836.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from omics.linear_model import (
    LINEAR_KEYS,
    LinearModelFit,
    checked_pieces_inputs,
    fit_linear_models,
    site_linear_statistics,
)

log = logging.getLogger(__name__)

VOOM_KEYS = (*LINEAR_KEYS, "log_library", "detected")
# features per block in site_weighted_statistics (as linear_model._COLUMN_BLOCK)
_COLUMN_BLOCK = 2048


def log2_cpm(counts: np.ndarray, lib_size: np.ndarray | None = None) -> np.ndarray:
    """voom's log2 counts per million, ``log2((count + 0.5) / (lib.size + 1) * 1e6)``, ``(n, p)``.

    ``lib_size`` ``(n,)`` defaults to the row sums of ``counts`` (limma's ``colSums`` of genes x samples).

    >>> log2_cpm(np.array([[0.0, 10.0], [5.0, 5.0]])).round(3).tolist()
    [[15.472, 19.864], [18.932, 18.932]]
    """
    counts, lib_size = _counts_and_library(counts, lib_size)
    return np.log2((counts + 0.5) / (lib_size[:, None] + 1.0) * 1e6)


def site_voom_statistics(
    counts: np.ndarray,
    design: np.ndarray,
    *,
    lib_size: np.ndarray | None = None,
    measured: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Round 1 of federated voom: one member's pieces, ready to be summed across members.

    Parameters
    ----------
    counts
        ``(n, p)`` non-negative counts of this member's samples (rows) and features.
    design
        ``(n, k)`` design columns without intercept and member dummies (as for
        :func:`omics.linear_model.site_linear_statistics`).
    lib_size
        ``(n,)`` library sizes; default the row sums of ``counts``.
    measured
        ``(p,)`` bool, False where this member did not measure the feature. Default: all True.

    Returns
    -------
    dict
        The keys :data:`VOOM_KEYS`: the ordinary (unweighted) pieces of the log2-CPM, plus ``log_library``
        ``(p,)``, the sum of ``log2(lib_size + 1)`` over the samples (where measured), and ``detected``
        ``(p,)``, the number of samples with a non-zero count (where measured).
    """
    counts, lib_size = _counts_and_library(counts, lib_size)
    n, p = counts.shape
    measured = _measured(measured, p)
    pieces = site_linear_statistics(log2_cpm(counts, lib_size), design, measured=measured)
    pieces["log_library"] = np.where(measured, float(np.sum(np.log2(lib_size + 1.0))) if n else 0.0, 0.0)
    pieces["detected"] = np.where(measured, np.count_nonzero(counts > 0, axis=0), 0).astype(np.float64)
    return pieces


@dataclass(frozen=True)
class Trend:
    """voom's mean-variance trend: the lowess line (``x`` increasing, ties averaged, ``y``) of
    ``sqrt(sigma)`` on the mean log2-count, interpolated linearly and constant beyond its ends
    (R's ``approxfun(rule = 2)``). ``span`` is lowess's ``f``; ``features`` how many features it used."""

    x: np.ndarray
    y: np.ndarray
    span: float
    features: int

    def __call__(self, log2_count: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(log2_count, dtype=np.float64), self.x, self.y)


def voom_trend(summed: Mapping[str, np.ndarray], *, columns: Sequence[str], span: float = 0.5) -> Trend:
    """The holder's step between the rounds: voom's lowess trend from the summed round-1 pieces.

    Parameters
    ----------
    summed
        The element-wise sum over members of :func:`site_voom_statistics` (keys :data:`VOOM_KEYS`).
    columns
        The ``k`` design column names.
    span
        lowess's ``f`` (limma's default 0.5).

    Returns
    -------
    Trend
        Fitted on the features with a residual variance and a count somewhere: ``sx = Amean +
        mean(log2(lib.size + 1)) - log2(1e6)``, ``sy = sqrt(sigma)``, ``lowess(sx, sy, f=span)``.
    """
    missing = [key for key in VOOM_KEYS if key not in summed]
    if missing:
        raise ValueError(
            f"summed lacks {missing}; pass the sum of site_voom_statistics outputs (found {sorted(summed)})"
        )
    if not 0 < span <= 1:
        raise ValueError(f"span must be in (0, 1], got {span}")
    fit = fit_linear_models(summed, columns=columns)
    samples = np.rint(np.asarray(summed["samples"], dtype=np.float64))
    detected = np.rint(np.asarray(summed["detected"], dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_log_library = np.asarray(summed["log_library"], dtype=np.float64) / samples
    sx = fit.amean + mean_log_library - np.log2(1e6)
    sy = np.sqrt(fit.sigma)
    use = fit.usable & (detected > 0) & np.isfinite(sx)
    if np.count_nonzero(use) < 2:
        raise ValueError(
            f"only {np.count_nonzero(use)} feature(s) have a count and a residual variance; voom needs at least "
            "two to fit a mean-variance trend"
        )
    if np.count_nonzero(use) < use.size:
        log.info("voom trend: %d of %d features used (no count or no residual df)", np.count_nonzero(use), use.size)
    x, y = lowess(sx[use], sy[use], f=span)
    x, start = np.unique(x, return_index=True)  # approxfun(ties = mean): lowess gives ties one value
    y = np.add.reduceat(y, start) / np.diff(np.append(start, y.size))
    return Trend(x=x, y=y, span=float(span), features=int(np.count_nonzero(use)))


def voom_fitted_values(
    log2cpm: np.ndarray, design: np.ndarray, fit: LinearModelFit, *, measured: np.ndarray | None = None
) -> np.ndarray:
    """A member's fitted log2-CPM under the broadcast round-1 fit, ``(n, p)``.

    The pooled fit with member dummies has, for this member's sample ``i``, the fitted value
    ``mean(y) + (x_i - mean(x)) beta`` (means over this member's samples); coefficients that are not
    estimable count as 0, as voom uses only the pivoted columns. NaN where not measured.
    """
    y = np.asarray(log2cpm, dtype=np.float64)
    design = np.asarray(design, dtype=np.float64)
    if y.ndim != 2 or design.ndim != 2 or design.shape[0] != y.shape[0]:
        raise ValueError(f"log2cpm (n, p) and design (n, k) must have the same rows, got {y.shape} and {design.shape}")
    if fit.coefficients.shape != (y.shape[1], design.shape[1]):
        raise ValueError(
            f"the fit has coefficients {fit.coefficients.shape} but log2cpm/design give "
            f"{(y.shape[1], design.shape[1])}; "
            "use the same feature panel and design columns as the fit"
        )
    measured = _measured(measured, y.shape[1])
    beta = np.nan_to_num(fit.coefficients, nan=0.0)
    xc = design - design.mean(axis=0)
    fitted = y.mean(axis=0) + xc @ beta.T
    fitted[:, ~measured] = np.nan
    return fitted


def voom_weights(trend: Trend, fitted_log2cpm: np.ndarray, lib_size: np.ndarray) -> np.ndarray:
    """voom's precision weights for a member's own observations, ``(n, p)``.

    ``fitted.count = 2^fitted.cpm * (lib.size + 1) / 1e6`` and ``w = 1 / trend(log2(fitted.count))^4``.
    NaN fitted values (unmeasured features) give weight 1.
    """
    fitted = np.asarray(fitted_log2cpm, dtype=np.float64)
    lib_size = np.asarray(lib_size, dtype=np.float64)
    if fitted.ndim != 2 or lib_size.shape != (fitted.shape[0],):
        raise ValueError(f"lib_size must have one entry per row of fitted_log2cpm {fitted.shape}, got {lib_size.shape}")
    log2_count = fitted + np.log2(lib_size + 1.0)[:, None] - np.log2(1e6)
    weights = 1.0 / trend(np.where(np.isnan(log2_count), 0.0, log2_count)) ** 4
    return np.where(np.isnan(log2_count), 1.0, weights)


def site_weighted_statistics(
    Y: np.ndarray, design: np.ndarray, weights: np.ndarray, *, measured: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """One member's pieces for weighted least squares with observation weights (limma's ``lmFit(weights=)``).

    The same keys and shapes as :func:`omics.linear_model.site_linear_statistics`. For each feature ``g``
    the member's fixed effect is removed by centering on the *weighted* means (Frisch-Waugh-Lovell under
    WLS): ``xtx[g] = Xc_g' W_g Xc_g``, ``xty[g] = Xc_g' W_g yc_g``, ``yty[g] = yc_g' W_g yc_g``; ``ysum`` is
    the unweighted sum (limma's ``Amean`` is the plain mean). Summed over members and passed to
    :func:`omics.linear_model.fit_linear_models`, this is the weighted pooled fit with member dummies.

    Parameters
    ----------
    Y
        ``(n, p)`` log-expression (for voom: :func:`log2_cpm`).
    design
        ``(n, k)`` design columns without intercept and member dummies.
    weights
        ``(n, p)`` positive finite precision weights (anything where not measured).
    measured
        ``(p,)`` bool; default all True.
    """
    Y, design, measured = checked_pieces_inputs(Y, design, measured)
    n, p = Y.shape
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n, p):
        raise ValueError(f"weights must have the shape of Y {Y.shape}, got {weights.shape}")
    k = design.shape[1]
    out = {
        "xtx": np.zeros((p, k * (k + 1) // 2)),
        "xty": np.zeros((p, k)),
        **{key: np.zeros(p) for key in ("yty", "ysum", "samples", "members")},
    }
    columns = np.flatnonzero(measured)
    if n == 0 or columns.size == 0:
        return out
    rows, cols = np.triu_indices(k)
    xc = design - design.mean(axis=0)  # unweighted pre-centering: only for accuracy, the result is shift-free
    products = xc[:, rows] * xc[:, cols]
    out["samples"][columns] = float(n)
    out["members"][columns] = 1.0
    for start in range(0, columns.size, _COLUMN_BLOCK):
        block = columns[start : start + _COLUMN_BLOCK]
        y, w = Y[:, block].astype(np.float64, copy=False), weights[:, block]
        if not np.isfinite(y).all():
            bad = block[~np.isfinite(y).all(axis=0)]
            raise ValueError(
                f"Y: {bad.size} measured feature(s) hold non-finite values (first: column {int(bad[0])}); "
                "impute them or mark them False in `measured`"
            )
        if not (np.isfinite(w).all() and (w > 0).all()):
            bad = block[~(np.isfinite(w) & (w > 0)).all(axis=0)]
            raise ValueError(
                f"weights: {bad.size} measured feature(s) hold weights that are not positive and finite "
                f"(first: column {int(bad[0])})"
            )
        total_w = w.sum(axis=0)
        xbar = (w.T @ xc) / total_w[:, None]  # (b, k) weighted means of the design
        yc = y - (w * y).sum(axis=0) / total_w  # weighted centering
        wy = w * yc
        out["xtx"][block] = w.T @ products - total_w[:, None] * xbar[:, rows] * xbar[:, cols]
        out["xty"][block] = wy.T @ xc  # sum w yc (xc - xbar) = sum w yc xc, as sum w yc = 0
        out["yty"][block] = np.einsum("ij,ij->j", wy, yc)
        out["ysum"][block] = y.sum(axis=0)
    return out


def lowess(x: np.ndarray, y: np.ndarray, *, f: float = 2 / 3, iter: int = 3, delta: float | None = None):
    """R's ``stats::lowess(x, y, f, iter, delta)``: returns ``(x sorted, fitted y)``.

    A port of R's ``clowess`` (Cleveland 1979): local linear fits with tricube weights over the
    ``floor(f n)`` nearest points, evaluated at points ``delta`` apart and interpolated between them,
    then ``iter`` robustness iterations with bisquare weights on 6 median absolute residuals. ``delta``
    defaults to ``0.01 * (max(x) - min(x))``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("lowess: x and y must be finite 1-D arrays of the same length")
    if not (np.isfinite(f) and f > 0) or iter < 0:
        raise ValueError(f"lowess: f must be positive and iter non-negative, got f={f}, iter={iter}")
    delta = 0.01 * float(np.ptp(x)) if delta is None else float(delta)
    order = np.argsort(x, kind="stable")  # R's order(): stable
    x, y = x[order], y[order]
    return x, _clowess(x, y, f, iter, delta)


def _clowess(x: np.ndarray, y: np.ndarray, f: float, nsteps: int, delta: float) -> np.ndarray:
    n = x.size
    if n < 2:
        return y.copy()
    ns = max(2, min(n, int(f * n + 1e-7)))
    ys = np.zeros(n)
    rw = np.ones(n)
    for iteration in range(1, nsteps + 2):
        robust = rw if iteration > 1 else None
        nleft, nright, last, i = 0, ns - 1, -1, 0
        while True:
            # move the window right while that does not increase its radius
            if nright < n - 1 and x[i] - x[nleft] > x[nright + 1] - x[i]:
                nleft += 1
                nright += 1
                continue
            fitted = _lowest(x, y, x[i], nleft, nright, robust)
            ys[i] = y[i] if fitted is None else fitted
            if last < i - 1:  # skipped points: interpolate
                between = np.arange(last + 1, i)
                alpha = (x[between] - x[last]) / (x[i] - x[last])
                ys[between] = alpha * ys[i] + (1.0 - alpha) * ys[last]
            last = i
            # the points within delta of the last fit are skipped; its ties take its value
            tied = int(np.searchsorted(x, x[last], side="right"))
            if tied - 1 > last:
                ys[last + 1 : tied] = ys[last]
                last = tied - 1
            beyond = int(np.searchsorted(x, x[i] + delta, side="right"))
            i = max(last + 1, beyond - 1)
            if last >= n - 1:
                break
        residuals = y - ys
        if iteration > nsteps:
            break
        scale = np.mean(np.abs(residuals))
        absolute = np.abs(residuals)
        ordered = np.sort(absolute)
        m1 = n // 2
        cmad = 3.0 * (ordered[m1] + ordered[n - m1 - 1]) if n % 2 == 0 else 6.0 * ordered[m1]
        if cmad < 1e-7 * scale:  # effectively zero
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            rw = np.where(
                absolute <= 0.001 * cmad,
                1.0,
                np.where(absolute <= 0.999 * cmad, (1.0 - (absolute / cmad) ** 2) ** 2, 0.0),
            )
    return ys


def _lowest(x: np.ndarray, y: np.ndarray, xs: float, nleft: int, nright: int, rw: np.ndarray | None):
    """R's ``lowest``: the local weighted linear fit at ``xs``; None when all weights are zero."""
    h = max(xs - x[nleft], x[nright] - xs)
    h9, h1 = 0.999 * h, 0.001 * h
    segment = x[nleft:]
    r = np.abs(segment - xs)
    # the scan stops at the first point beyond the radius on the right (ties on the right are picked up)
    stop = np.flatnonzero((r > h9) & (segment > xs))
    end = nleft + (int(stop[0]) if stop.size else segment.size)
    r, xj = r[: end - nleft], x[nleft:end]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(r <= h9, np.where(r <= h1, 1.0, (1.0 - (r / h) ** 3) ** 3), 0.0)
    if rw is not None:
        w = w * rw[nleft:end]
    total = w.sum()
    if total <= 0.0:
        return None
    w = w / total
    if h > 0.0:
        center = np.sum(w * xj)
        spread = np.sum(w * (xj - center) ** 2)
        if np.sqrt(spread) > 0.001 * (x[-1] - x[0]):
            w = w * ((xs - center) / spread * (xj - center) + 1.0)
    return float(np.sum(w * y[nleft:end]))


def _counts_and_library(counts: np.ndarray, lib_size: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D (samples x features), got shape {counts.shape}")
    if np.isnan(counts).any() or (counts < 0).any():
        raise ValueError("counts must be non-negative with no NA (voom's requirement)")
    lib_size = counts.sum(axis=1) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if lib_size.shape != (counts.shape[0],) or not (np.isfinite(lib_size).all() and (lib_size >= 0).all()):
        raise ValueError(f"lib_size must hold one non-negative finite number per row of counts {counts.shape}")
    return counts, lib_size


def _measured(measured: np.ndarray | None, p: int) -> np.ndarray:
    measured = np.ones(p, dtype=bool) if measured is None else np.asarray(measured)
    if measured.shape != (p,) or measured.dtype != bool:
        raise ValueError(f"measured must be a bool array of shape ({p},), got {measured.dtype} {measured.shape}")
    return measured
