"""Empirical Bayes variance squeezing of limma (Smyth 2004; Phipson et al. 2016), in numpy/scipy.

The gene-wise residual variances ``s2`` with ``d`` degrees of freedom are modelled as scaled F
(``s2 / s0^2 ~ F(d, d0)``); the prior ``(s0^2, d0)`` is estimated by moments of ``log s2``
(:func:`fit_f_dist`, trigamma inversion), optionally with a trend of ``s0^2`` in a covariate (a
natural cubic spline in the average log expression, limma-trend), or robustly to outlier variances
(:func:`fit_f_dist_robustly`, winsorized moments and per-feature prior df). The posterior variance is
``(d s2 + d0 s0^2) / (d + d0)`` (:func:`squeeze_var`).

These are limma's "legacy" estimators (the only ones up to limma 3.60, and the ones limma still
uses when every feature has the same residual df). :func:`moderated_lods` and :func:`tmixture` give
eBayes's B statistic.

References
----------
Smyth, G. K. (2004). Linear models and empirical Bayes methods for assessing differential expression
in microarray experiments. Statistical Applications in Genetics and Molecular Biology 3(1), 3.
Phipson, B., Lee, S., Majewski, I. J., Alexander, W. S. and Smyth, G. K. (2016). Robust
hyperparameter estimation protects against hypervariable genes and improves power to detect
differential expression. Annals of Applied Statistics 10(2), 946-963.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import optimize, special, stats
from scipy.interpolate import BSpline
from scipy.linalg import null_space

if TYPE_CHECKING:  # for the annotations only: linear_model imports this module
    from omics.linear_model import LinearModelFit

log = logging.getLogger(__name__)

# limma's floors: a variance below this share of the median is offset away from zero, because log(0)
# would dominate the moments of log s2
_SMALL_VARIANCE = 1e-5
_ROBUST_SMALL_VARIANCE = 1e-12
# 128-point Gauss-Legendre rule on [0, 1] for the winsorized moments (limma: gauss.quad.prob(128))
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(128)
_NODES, _WEIGHTS = (_NODES + 1.0) / 2.0, _WEIGHTS / 2.0


@dataclass(frozen=True)
class PriorFit:
    """Estimated prior: ``scale`` is ``s0^2`` (scalar, or per feature with a trend); ``df`` is ``d0``
    (scalar, or per feature when robust: limma's ``df2.shrunk``); ``df_bulk`` is the scalar ``d0`` of
    the bulk of the features (``df2``), equal to ``df`` when not robust."""

    scale: float | np.ndarray
    df: float | np.ndarray
    df_bulk: float = np.nan


def trigamma_inverse(x: np.ndarray) -> np.ndarray:
    """Solve ``trigamma(y) = x`` for ``y > 0`` by Newton's method on ``1/trigamma`` (limma's scheme).

    The start ``0.5 + 1/x`` is already close; ``1/trigamma`` is nearly linear, so iterations converge
    monotonically. Very large or small ``x`` use the asymptotes ``1/sqrt(x)`` and ``1/x``.

    >>> from scipy.special import polygamma
    >>> trigamma_inverse(polygamma(1, np.array([0.5, 3.0]))).round(12).tolist()
    [0.5, 3.0]
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.full(x.shape, np.nan)
    big, small = x > 1e7, (x < 1e-6) & (x >= 0)
    y[big] = 1.0 / np.sqrt(x[big])
    y[small] = 1.0 / x[small]
    todo = (x >= 1e-6) & (x <= 1e7)
    z, target = 0.5 + 1.0 / x[todo], x[todo]
    for _ in range(50):
        tri = special.polygamma(1, z)
        step = tri * (1.0 - tri / target) / special.polygamma(2, z)
        z = z + step
        if np.all(-step / z < 1e-8):
            break
    y[todo] = z
    return y


def natural_spline_basis(x: np.ndarray, *, df: int, knots_from: np.ndarray | None = None) -> np.ndarray:
    """A basis of the span of R's ``splines::ns(x, df=df, intercept=TRUE)``.

    Interior knots at the ``df - 2`` evenly spaced quantiles (type 7) and boundary knots at the range
    of ``knots_from`` (default ``x``); outside the boundary the functions continue linearly, as
    ``predict.ns`` does. Only the span matters to a least-squares fit, so the basis is any one
    satisfying the natural (zero second derivative) boundary constraints.
    """
    x = np.asarray(x, dtype=np.float64)
    ref = x if knots_from is None else np.asarray(knots_from, dtype=np.float64)
    lo, hi = float(ref.min()), float(ref.max())
    interior = np.quantile(ref, np.linspace(0.0, 1.0, df)[1:-1]) if df > 2 else np.empty(0)
    t = np.concatenate([[lo] * 4, interior, [hi] * 4])
    nbasis = len(t) - 4
    spline = BSpline(t, np.eye(nbasis), 3, extrapolate=False)
    slope = spline.derivative(1)
    constraints = spline.derivative(2)(np.array([lo, hi]))
    natural = null_space(constraints)  # (nbasis, df): the basis functions with zero curvature at both ends
    basis = np.empty((len(x), nbasis))
    inside = (x >= lo) & (x <= hi)
    basis[inside] = spline(x[inside])
    for edge, side in ((lo, x < lo), (hi, x > hi)):
        if side.any():
            basis[side] = spline(np.array([edge])) + (x[side] - edge)[:, None] * slope(np.array([edge]))
    return basis @ natural


def fit_f_dist(x: np.ndarray, df1: np.ndarray, *, covariate: np.ndarray | None = None) -> PriorFit:
    """Moment estimates of ``s0^2`` and ``d0`` from ``x = s2`` with ``df1 = d`` (limma's ``fitFDist``).

    ``log s2`` has mean ``log s0^2 + digamma(d/2) - log(d/2) - digamma(d0/2) + log(d0/2)`` and
    variance ``trigamma(d/2) + trigamma(d0/2)``; ``d0`` solves the variance equation (infinite when
    the observed variance is below ``mean(trigamma(d/2))``). With a covariate the mean is a natural
    spline in it (``splinedf = 1 + [n>=3] + [n>=6] + [n>=30]``, at most the number of distinct
    values) and the variance is the residual mean square.
    """
    x, df1 = np.asarray(x, dtype=np.float64), np.broadcast_to(np.asarray(df1, dtype=np.float64), np.shape(x))
    n = x.size
    ok = np.isfinite(df1) & (df1 > 1e-15) & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok == 0:
        return PriorFit(np.nan, np.nan, np.nan)
    if nok == 1:
        return PriorFit(float(x[ok][0]), 0.0, 0.0)
    cov = None if covariate is None else np.asarray(covariate, dtype=np.float64)
    splinedf = 1
    if cov is not None:
        splinedf = min(1 + (nok >= 3) + (nok >= 6) + (nok >= 30), len(np.unique(cov[ok])))
        if splinedf < 2:
            flat = fit_f_dist(x[ok], df1[ok])
            return PriorFit(np.full(n, flat.scale), flat.df, flat.df)
    s2, d = np.maximum(x[ok], 0.0), df1[ok]
    m = float(np.median(s2))
    if m == 0:
        log.warning("More than half of the residual variances are exactly zero: eBayes is unreliable")
        m = 1.0
    elif (s2 == 0).any():
        log.warning("Zero sample variances detected; they have been offset away from zero")
    s2 = np.maximum(s2, _SMALL_VARIANCE * m)
    e = np.log(s2) - special.digamma(d / 2.0) + np.log(d / 2.0)
    if cov is None:
        emean = float(e.mean())
        evar = float(((e - emean) ** 2).sum() / (nok - 1))
    else:
        design = natural_spline_basis(cov[ok], df=splinedf)
        coef, _, rank, _ = np.linalg.lstsq(design, e, rcond=None)
        fitted = design @ coef
        evar = float(((e - fitted) ** 2).sum() / (nok - rank))
        emean = np.full(n, np.nan)
        emean[ok] = fitted
        # features left out of the fit still get the trend's value (limma: predict(ns, newx))
        other = ~ok & np.isfinite(cov)
        if other.any():
            emean[other] = natural_spline_basis(cov[other], df=splinedf, knots_from=cov[ok]) @ coef
    evar -= float(np.mean(special.polygamma(1, d / 2.0)))
    if evar > 0:
        df2 = 2.0 * float(trigamma_inverse(np.array([evar]))[0])
        scale = np.exp(emean + special.digamma(df2 / 2.0) - np.log(df2 / 2.0))
    else:
        df2 = np.inf
        scale = float(np.mean(s2)) if cov is None else np.exp(emean)
    return PriorFit(float(scale) if np.ndim(scale) == 0 else scale, df2, df2)


def _winsorized_moments(df1: float, df2: float, tail: np.ndarray) -> tuple[float, float]:
    """Mean and variance of ``log F(df1, df2)`` winsorized at the ``tail`` probabilities; the integral
    runs over ``u = F/(1+F)`` (a finite interval) by Gauss-Legendre quadrature."""
    dist = stats.chi2(df1, scale=1.0 / df1) if np.isinf(df2) else stats.f(df1, df2)
    fq = dist.ppf([tail[0], 1.0 - tail[1]])
    zq = np.log(fq)
    q = fq / (1.0 + fq)
    nodes = q[0] + (q[1] - q[0]) * _NODES
    fnodes = nodes / (1.0 - nodes)
    znodes = np.log(fnodes)
    density = dist.pdf(fnodes) / (1.0 - nodes) ** 2
    width = q[1] - q[0]
    mean = width * np.sum(_WEIGHTS * density * znodes) + np.sum(zq * tail)
    var = width * np.sum(_WEIGHTS * density * (znodes - mean) ** 2) + np.sum((zq - mean) ** 2 * tail)
    return float(mean), float(var)


def fit_f_dist_robustly(x: np.ndarray, df1: np.ndarray, *, winsor_tail_p=(0.05, 0.1)) -> PriorFit:
    """Robust ``(s0^2, d0)`` (limma's ``fitFDistRobustly`` without a covariate; Phipson et al. 2016).

    ``d0`` matches the variance of the winsorized ``log s2`` to its theoretical value; features whose
    variance is an outlier (its upper tail probability below its empirical one) get a smaller,
    per-feature prior df, so they are squeezed less. Returns ``df`` as a per-feature array.
    """
    x, df1 = np.asarray(x, dtype=np.float64), np.broadcast_to(np.asarray(df1, dtype=np.float64), np.shape(x))
    ok = ~np.isnan(x) & np.isfinite(df1) & (df1 > 1e-6)
    n = x.size
    if n < 2:
        return PriorFit(np.nan, np.full(n, np.nan), np.nan)
    if n == 2:
        plain = fit_f_dist(x, df1)
        return PriorFit(plain.scale, np.full(n, plain.df), plain.df)
    if not ok.all():
        inner = fit_f_dist_robustly(x[ok], df1[ok], winsor_tail_p=winsor_tail_p)
        shrunk = np.empty(n)
        shrunk[ok] = inner.df
        # the features left out get the prior df of the bulk (limma: df2, not df2.shrunk)
        shrunk[~ok] = inner.df_bulk
        return PriorFit(inner.scale, shrunk, inner.df_bulk)
    m = float(np.median(x))
    if m <= 0:
        raise ValueError("residual variances: more than half are <= 0; robust eBayes needs positive variances")
    x = np.maximum(x, m * _ROBUST_SMALL_VARIANCE)
    plain = fit_f_dist(x, df1)
    tail = np.broadcast_to(np.asarray(winsor_tail_p, dtype=np.float64), (2,)).copy()
    if np.all(tail < 1.0 / n):
        return PriorFit(plain.scale, np.full(n, plain.df), plain.df)
    # unequal df: map each variance to the F quantile it would have with the largest df
    d = float(df1.max())
    fewer = df1 < d - 1e-14
    if fewer.any():
        f = x[fewer] / plain.scale
        upper = stats.f.logsf(f, df1[fewer], plain.df)
        lower = stats.f.logcdf(f, df1[fewer], plain.df)
        up = upper < lower
        f[up] = stats.f.isf(np.exp(upper[up]), d, plain.df)
        f[~up] = stats.f.ppf(np.exp(lower[~up]), d, plain.df)
        x = x.copy()
        x[fewer] = f * plain.scale
    z = np.log(x)
    ztrend = float(stats.trim_mean(z, tail[1]))
    zresid = z - ztrend
    lo, hi = np.quantile(zresid, [tail[0], 1.0 - tail[1]])
    zwins = np.clip(zresid, lo, hi)
    zwmean = float(zwins.mean())
    zwvar = float(np.mean((zwins - zwmean) ** 2) * n / (n - 1))

    def gap(u: float) -> float:  # on the link scale u = d0/(1+d0), u in [0, 1)
        return np.log(zwvar / _winsorized_moments(d, u / (1.0 - u) if u < 1.0 else np.inf, tail)[1])

    at_inf = np.log(zwvar / _winsorized_moments(d, np.inf, tail)[1])
    if at_inf <= 0:
        # winsorized log variances no more spread than with d0 = inf: one common variance
        s20 = np.exp(ztrend + zwmean - _winsorized_moments(d, np.inf, tail)[0])
        fstat = np.exp(z) / s20
        tail_p = stats.chi2.sf(fstat * d, d)
        empirical = (n - stats.rankdata(fstat) + 0.5) / n
        not_outlier = np.minimum(tail_p / empirical, 1.0)
        shrunk = np.full(n, np.inf)
        if (not_outlier < 1).any():
            shrunk[not_outlier < 1] = not_outlier[not_outlier < 1] * n * d
            o = np.argsort(tail_p, kind="stable")
            shrunk[o] = np.maximum.accumulate(shrunk[o])
        return PriorFit(float(s20), shrunk, np.inf)
    if np.isinf(plain.df):
        return PriorFit(plain.scale, np.full(n, np.inf), np.inf)
    start = plain.df / (1.0 + plain.df)
    if gap(start) >= 0:
        d0 = plain.df
    else:
        root = optimize.brentq(gap, start, 1.0, xtol=1e-12, rtol=1e-14)
        d0 = root / (1.0 - root)
    s20 = np.exp(ztrend + zwmean - _winsorized_moments(d, d0, tail)[0])
    fstat = np.exp(z) / s20
    log_tail = stats.f.logsf(fstat, d, d0)
    log_empirical = np.log(n - stats.rankdata(fstat) + 0.5) - np.log(n)
    log_not_outlier = np.minimum(log_tail - log_empirical, 0.0)
    if not (log_not_outlier < 0).any():
        return PriorFit(float(s20), np.full(n, d0), d0)
    not_outlier, outlier = np.exp(log_not_outlier), -np.expm1(log_not_outlier)
    worst = float(log_tail.min())
    if worst == -np.inf:
        shrunk = not_outlier * d0
    else:
        # the prior df at which the most extreme variance would have tail probability 1/2
        df_outlier = np.log(0.5) / worst * d0
        df_outlier = np.log(0.5) / float(stats.f.logsf(fstat.max(), d, df_outlier)) * df_outlier
        shrunk = not_outlier * d0 + outlier * df_outlier
    o = np.argsort(log_tail, kind="stable")
    ordered = shrunk[o]
    running = np.cumsum(ordered) / np.arange(1, n + 1)
    imin = int(np.argmin(running))
    ordered[: imin + 1] = running[imin]
    shrunk[o] = np.maximum.accumulate(ordered)
    return PriorFit(float(s20), shrunk, d0)


def squeeze_var(
    var: np.ndarray,
    df: np.ndarray,
    *,
    covariate: np.ndarray | None = None,
    robust: bool = False,
    winsor_tail_p=(0.05, 0.1),
) -> tuple[PriorFit, np.ndarray]:
    """Prior and posterior variances (limma's ``squeezeVar``).

    Features with ``df == 0`` or a non-finite ``var`` take no part in the estimation; their posterior
    is NaN. Returns ``(prior, var_post)`` with ``var_post = (df var + d0 s0^2) / (df + d0)``.
    """
    var, df = np.asarray(var, dtype=np.float64), np.asarray(df, dtype=np.float64)
    usable = np.isfinite(var) & (df > 0)
    x, d = np.where(usable, var, np.nan), np.where(usable, df, 0.0)
    if robust and covariate is not None:
        raise ValueError(
            "robust=True with trend=True (a covariate) needs limma's lowess trend of fitFDistRobustly, which "
            "is not implemented here; use robust=True or trend=True, not both"
        )
    prior = fit_f_dist_robustly(x, d, winsor_tail_p=winsor_tail_p) if robust else fit_f_dist(x, d, covariate=covariate)
    if np.isnan(prior.df).any() or np.isnan(prior.df_bulk):
        raise ValueError(
            f"residual variances: could not estimate the prior df from {int(usable.sum())} usable feature(s); "
            "eBayes needs at least two features with residual df > 0"
        )
    d0 = np.broadcast_to(prior.df, var.shape)
    s0 = np.broadcast_to(prior.scale, var.shape)
    with np.errstate(invalid="ignore"):
        post = np.where(np.isinf(d0), s0, (df * var + d0 * s0) / (df + d0))
    return prior, np.where(usable, post, np.nan)


def tmixture(t: np.ndarray, stdev_unscaled: np.ndarray, df: np.ndarray, proportion: float, v0_lim) -> float:
    """Prior variance of the non-zero coefficients (limma's ``tmixture.vector``) from the largest |t|.

    The top ``proportion/2`` share of |t| (each first mapped to the t quantile with the largest df) is
    matched to the quantiles of the mixture ``(1-p) t + p t * sqrt(1 + v0/v1)``; ``v0`` is the mean of
    the per-feature solutions, clipped to ``v0_lim``. NaN when too few features.
    """
    keep = np.isfinite(t)
    t, v1, df = np.abs(t[keep]), stdev_unscaled[keep] ** 2, df[keep]
    ngenes = t.size
    ntarget = int(np.ceil(proportion / 2.0 * ngenes))
    if ntarget < 1:
        return np.nan
    p = max(ntarget / ngenes, proportion)
    max_df = float(df.max())
    fewer = df < max_df
    if fewer.any():
        t = t.copy()
        t[fewer] = stats.t.isf(np.exp(stats.t.logsf(t[fewer], df[fewer])), max_df)
    o = np.argsort(-t, kind="stable")[:ntarget]
    t, v1 = t[o], v1[o]
    r = np.arange(1, ntarget + 1)
    p0 = 2.0 * stats.t.sf(t, max_df)
    ptarget = ((r - 0.5) / ngenes - (1.0 - p) * p0) / p
    v0 = np.zeros(ntarget)
    pos = ptarget > p0
    if pos.any():
        qtarget = stats.t.isf(ptarget[pos] / 2.0, max_df)
        v0[pos] = v1[pos] * ((t[pos] / qtarget) ** 2 - 1.0)
    return float(np.mean(np.clip(v0, v0_lim[0], v0_lim[1])))


def moderated_lods(t, stdev_unscaled, df_total, df_prior, var_prior, proportion: float) -> np.ndarray:
    """eBayes's B statistic ``(p, k)``: log posterior odds that the coefficient is non-zero, given the
    prior variance ``var_prior`` ``(k,)`` of the non-zero coefficients (see :func:`tmixture`)."""
    r = (stdev_unscaled**2 + var_prior[None, :]) / stdev_unscaled**2
    t2 = t**2
    dft = np.broadcast_to(np.asarray(df_total, dtype=np.float64)[:, None], t.shape)
    infinite = np.broadcast_to(np.asarray(df_prior, dtype=np.float64) > 1e6, (t.shape[0],))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        # an infinite prior df makes the t a z: the limit of the kernel below
        kernel = np.where(
            np.broadcast_to(infinite, t.shape),
            t2 * (1.0 - 1.0 / r) / 2.0,
            (1.0 + dft) / 2.0 * np.log((t2 + dft) / (t2 / r + dft)),
        )
    return np.log(proportion / (1.0 - proportion)) - np.log(r) / 2.0 + kernel


@dataclass(frozen=True)
class ModeratedFit:
    """limma's eBayes output for a :class:`LinearModelFit`.

    ``df_prior`` and ``s2_prior`` are scalars, or per feature (``df_prior`` when robust, ``s2_prior``
    with a trend); ``s2_post``, ``df_total`` ``(p,)``; ``t``, ``p_value``, ``lods`` (B) ``(p, k)``.
    Features without a residual variance (see :attr:`LinearModelFit.usable`) hold NaN.
    """

    df_prior: float | np.ndarray
    s2_prior: float | np.ndarray
    s2_post: np.ndarray
    t: np.ndarray
    p_value: np.ndarray
    df_total: np.ndarray
    lods: np.ndarray
    trend: bool
    robust: bool


def ebayes(
    fit: LinearModelFit,
    *,
    trend: bool = False,
    robust: bool = False,
    proportion: float = 0.01,
    stdev_coef_lim: tuple[float, float] = (0.1, 4.0),
    winsor_tail_p: tuple[float, float] = (0.05, 0.1),
) -> ModeratedFit:
    """Empirical Bayes moderated t statistics, p-values and B statistics (limma's ``eBayes``).

    Equals ``eBayes(fit, legacy=TRUE)``, which is also limma's default while every feature has the same
    residual df. With unequal df (a member that did not measure a feature, a column not estimable for
    some features) limma >= 3.61 defaults to ``fitFDistUnequalDF1``, not implemented here.

    Parameters
    ----------
    fit
        The output of :func:`fit_linear_models`.
    trend
        Let the prior variance depend on AveExpr (limma-trend: a natural cubic spline).
    robust
        Robust prior estimation, protecting against outlier variances (Phipson et al. 2016).
    proportion
        Assumed share of features with a non-zero coefficient (for B).
    stdev_coef_lim
        Limits of the prior standard deviation of non-zero coefficients, relative to sigma (for B).
    winsor_tail_p
        Winsorization tail shares of the robust estimation.

    Returns
    -------
    ModeratedFit
    """
    if not 0.0 < proportion < 1.0:
        raise ValueError(f"proportion must lie in (0, 1), got {proportion}; it is the share of non-null features")
    lim = np.asarray(stdev_coef_lim, dtype=np.float64)
    if lim.shape != (2,) or not (0.0 < lim[0] <= lim[1]):
        raise ValueError(f"stdev_coef_lim must be two positive numbers (low, high), got {stdev_coef_lim}")
    usable = fit.usable
    if usable.sum() < 2:
        raise ValueError(
            f"fit has {int(usable.sum())} feature(s) with residual df > 0; eBayes needs at least two "
            "(more samples than members + estimable columns)"
        )
    df = np.where(usable, fit.df_residual, 0.0)
    prior, s2_post = squeeze_var(
        fit.sigma**2, df, covariate=fit.amean if trend else None, robust=robust, winsor_tail_p=winsor_tail_p
    )
    stdev, k = fit.stdev_unscaled, fit.coefficients.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(usable[:, None], fit.coefficients / stdev / np.sqrt(s2_post)[:, None], np.nan)
    # df.total is capped by the pooled df: more prior df than the data hold would overstate precision
    df_total = np.where(usable, np.minimum(df + prior.df, df.sum()), np.nan)
    p_value = 2.0 * stats.t.sf(np.abs(t), df_total[:, None])
    s2_prior = np.asarray(prior.scale)
    var_prior_lim = lim**2 / np.nanmedian(s2_prior)
    var_prior = np.array([tmixture(t[:, j], stdev[:, j], df_total, proportion, var_prior_lim) for j in range(k)])
    if np.isnan(var_prior).any():
        log.warning("estimation of var.prior failed for some coefficients; set to 1/s2.prior as limma does")
        var_prior[np.isnan(var_prior)] = 1.0 / float(np.nanmedian(s2_prior))
    lods = moderated_lods(t, stdev, df_total, prior.df, var_prior, proportion)
    return ModeratedFit(
        df_prior=prior.df if np.ndim(prior.df) else float(prior.df),
        s2_prior=prior.scale if np.ndim(prior.scale) else float(prior.scale),
        s2_post=s2_post,
        t=t,
        p_value=p_value,
        df_total=df_total,
        lods=np.where(usable[:, None], lods, np.nan),
        trend=trend,
        robust=robust,
    )
