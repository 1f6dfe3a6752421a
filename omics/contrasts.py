"""Contrasts, F tests and heterogeneity on a federated limma fit: the subgroup (region) analyses.

From :class:`omics.linear_model.LinearModelFit` (and its :class:`omics.ebayes.ModeratedFit`):
:func:`contrast_effects` (a linear combination of coefficients, moderated as limma's ``contrasts.fit``
+ ``eBayes``), :func:`f_test` (the ordinary F test that several coefficients are 0, as OLS gives it) and
:func:`cochran_q` (Cochran's Q and I² across subgroup effects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from omics.ebayes import ModeratedFit
from omics.linear_model import LinearModelFit, column_index


def contrast_effects(
    fit: LinearModelFit, moderated: ModeratedFit, *, weights: Mapping[str, float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moderated test of a linear combination ``c'beta`` (limma's ``contrasts.fit`` then ``eBayes``).

    Parameters
    ----------
    fit, moderated
        The outputs of :func:`fit_linear_models` and :func:`ebayes`.
    weights
        The contrast ``c``: a mapping column name -> weight (absent columns weigh 0) or a ``(k,)`` array.

    Returns
    -------
    estimate, se, t, p : numpy.ndarray
        ``(p,)`` each: ``c'beta``, ``sqrt(c'Vc s2_post)``, their ratio and its two-sided p-value with
        ``df_total`` df. NaN where a column with non-zero weight is not estimable.

    Notes
    -----
    A contrast leaves sigma, the df and AveExpr unchanged, so eBayes after ``contrasts.fit`` squeezes
    the same variances: only the unscaled variance ``c'Vc`` is new. (limma's B for the contrast would
    need the tmixture step again; it is not returned.)
    """
    c = _contrast_vector(fit, weights)
    used = c != 0
    beta = np.where(used, fit.coefficients, 0.0)
    cov = np.where(used[:, None] & used[None, :], fit.cov_unscaled, 0.0)
    estimate = beta @ c
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.einsum("i,gij,j->g", c, cov, c) * moderated.s2_post)
        t = estimate / se
    p = 2.0 * stats.t.sf(np.abs(t), moderated.df_total)
    return estimate, se, t, p


def f_test(fit: LinearModelFit, *, coefs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ordinary (not moderated) F test that all the named coefficients are zero, per feature.

    Returns
    -------
    F, p_value, df1, df2 : numpy.ndarray
        ``(p,)`` each. ``df1`` counts the named coefficients estimable for the feature (non-estimable
        ones are constrained to zero already), ``df2`` is the residual df. NaN where nothing is tested.
    """
    index = [column_index(fit, c, "coefs") for c in coefs]
    if not index or len(set(index)) != len(index):
        raise ValueError(f"coefs must name one or more distinct columns of {list(fit.columns)}, got {list(coefs)}")
    beta = fit.coefficients[:, index]
    cov = fit.cov_unscaled[np.ix_(np.arange(beta.shape[0]), index, index)]
    tested = np.isfinite(beta)
    df1 = tested.sum(axis=1).astype(np.float64)
    statistic = np.full(beta.shape[0], np.nan)
    for pattern in np.unique(tested, axis=0):
        rows = np.flatnonzero((tested == pattern).all(axis=1) & fit.usable)
        keep = np.flatnonzero(pattern)
        if rows.size == 0 or keep.size == 0:
            continue
        b = beta[np.ix_(rows, keep)]
        quad = np.einsum("gi,gi->g", b, np.linalg.solve(cov[np.ix_(rows, keep, keep)], b[..., None])[..., 0])
        statistic[rows] = quad / keep.size / fit.sigma[rows] ** 2
    df2 = np.where(fit.usable, fit.df_residual, np.nan)
    df1 = np.where(np.isfinite(statistic), df1, np.nan)
    return statistic, stats.f.sf(statistic, df1, df2), df1, df2


def cochran_q(effects: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cochran's Q heterogeneity test across ``R`` subgroup effects, and I².

    Parameters
    ----------
    effects, se
        ``(p, R)`` effects and their standard errors; a non-finite pair is left out of that feature.

    Returns
    -------
    Q, p, I2 : numpy.ndarray
        ``(p,)``: ``Q = sum w (e - ebar_w)^2`` with ``w = 1/se^2``, its chi-square p-value with
        (subgroups - 1) df, and ``I2 = max(0, (Q - df) / Q)``. NaN with fewer than two subgroups.

    Examples
    --------
    >>> Q, p, I2 = cochran_q(np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]), np.ones((2, 3)))
    >>> Q.tolist(), p.round(4).tolist(), I2.tolist()
    ([0.0, 2.0], [1.0, 0.3679], [0.0, 0.0])
    """
    effects, se = np.asarray(effects, dtype=np.float64), np.asarray(se, dtype=np.float64)
    if effects.ndim != 2 or effects.shape != se.shape:
        raise ValueError(
            f"effects and se must be 2-D of the same shape (features x subgroups), got {effects.shape} and "
            f"{se.shape}; stack one column per subgroup"
        )
    if (se <= 0).any():
        raise ValueError("se holds zero or negative standard errors; pass positive SEs (NaN for a missing subgroup)")
    ok = np.isfinite(effects) & np.isfinite(se)
    w = np.where(ok, 1.0 / np.where(ok, se, 1.0) ** 2, 0.0)
    e = np.where(ok, effects, 0.0)
    df = ok.sum(axis=1) - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = (w * e).sum(axis=1) / w.sum(axis=1)
        q = np.where(df >= 1, (w * (e - pooled[:, None]) ** 2).sum(axis=1), np.nan)
        i2 = np.where(q > 0, np.maximum(0.0, (q - df) / q), np.where(q == 0, 0.0, np.nan))
    return q, stats.chi2.sf(q, np.where(df >= 1, df, np.nan)), i2


def _contrast_vector(fit: LinearModelFit, weights) -> np.ndarray:
    k = len(fit.columns)
    if isinstance(weights, Mapping):
        c = np.zeros(k)
        for name, value in weights.items():
            c[column_index(fit, name, "weights")] = float(value)
    else:
        c = np.asarray(weights, dtype=np.float64)
        if c.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) (one per column of {list(fit.columns)}), got {c.shape}")
    if not np.isfinite(c).all() or not c.any():
        raise ValueError(f"weights must be finite and not all zero, got {c.tolist()}")
    return c
