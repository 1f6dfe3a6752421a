"""Exact federated limma: ``lmFit`` + ``eBayes`` + ``topTable`` from per-member sums.

The model for each feature ``g`` is ``y_g ~ design + member`` (a member factor in the design). The
member effects are removed by centering within each member (Frisch-Waugh-Lovell), so each member
sends centered cross-products that the server only adds (possibly under CKKS):

- member: :func:`site_linear_statistics` -> the arrays of :data:`LINEAR_KEYS`;
- server: element-wise sum;
- holder of the sum: :func:`fit_linear_models` -> :func:`omics.ebayes.ebayes` -> :func:`top_table`;
  :mod:`omics.contrasts` for subgroup (interaction) analyses.

The coefficients, their unscaled covariance and the residual variance equal those of the pooled fit
with the member dummies (FWL: the within-member centered design spans the same residual space), and
the residual df is ``n - members - rank``. The variance squeezing is in :mod:`omics.ebayes`.

Members whose platform is noisier than the others' can be down-weighted as limma's
``arrayWeights(var.group=member)`` does: each member estimates its variance factor from the broadcast
fit (:func:`member_variance_factor`) and scales its own sums (``weight=``); the server still only adds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from omics.chunked import csr_rows_per_block, is_chunked
from omics.ebayes import ModeratedFit

log = logging.getLogger(__name__)

LINEAR_KEYS = ("xtx", "xty", "yty", "ysum", "samples", "members")
TOP_TABLE_COLUMNS = ["feature", "logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B", "members", "samples"]
# features per block in site_linear_statistics: bounds the temporaries to ~ n x 2048 floats
_COLUMN_BLOCK = 2048
_SPARSE_BLOCK_VALUES = 2**21  # nonzeros of a CSR matrix made float64 at a time
# A column is not estimable when its sum of squares left after the earlier estimable columns is below
# this share of its own (within-member) sum of squares. lm's 1e-7 is on the norm (1e-14 on the sum
# of squares), which CKKS noise (~1e-9 relative) would defeat; on the sum of squares it still flags
# only columns with R^2 > 1 - 1e-7 against the earlier ones.
ALIAS_TOLERANCE = 1e-7
# Under CKKS a sum of zeros (a column constant within every member, a level no measuring member has)
# decrypts to noise (~1e-5 after the statistics' 1e4 sum scale), which the relative test above cannot
# tell from a column. A remaining sum of squares is also negligible when it is at most ALIAS_TOLERANCE
# of the feature's largest column AND at most this much per sample (both, so that a column in large
# units, age in days, does not make a 0/1 column look negligible).
NEGLIGIBLE_PER_SAMPLE = 1e-5


def site_linear_statistics(
    Y: np.ndarray,
    design: np.ndarray,
    *,
    measured: np.ndarray | None = None,
    weight: float = 1.0,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One member's within-member centered cross-products, ready to be summed across members.

    Parameters
    ----------
    Y
        ``(n, p)`` float log-expression of this member's rows used.
    design
        ``(n, k)`` float design columns without intercept and without member dummies (treatment coded).
    measured
        ``(p,)`` bool; False where this member did not measure the feature (it contributes nothing
        there, and ``Y`` may hold anything in those columns). Default: all True.
    weight
        Member-level precision weight (1.0: ordinary least squares). It scales ``xtx``, ``xty`` and
        ``yty``, which makes the fit weighted least squares with this weight on every row of the
        member, as limma's ``arrayWeights(var.group=member)`` weights do; see
        :func:`member_variance_factor` for estimating it.
    rows
        Dense ``Y`` only: the positions of the ``n`` rows of ``Y`` that ``design`` describes (default: all
        of them); each block of columns reads them, so the rows are never copied whole.

    Returns
    -------
    dict
        Float64 arrays (zero where not measured): ``xtx`` ``(p, k(k+1)/2)`` (upper triangle of
        ``Xc'Xc`` in ``np.triu_indices(k)`` order), ``xty`` ``(p, k)``, ``yty`` ``(p,)``, ``ysum``
        ``(p,)``, ``samples`` ``(p,)`` and ``members`` ``(p,)`` (1.0).
    """
    if rows is not None and (sp.issparse(Y) or is_chunked(Y)):
        Y, rows = (Y.take(rows) if is_chunked(Y) else Y[rows]), None
    Y, design, measured = checked_pieces_inputs(Y, design, measured, rows=rows)
    n, p = design.shape[0], Y.shape[1]
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive finite number, got {weight}; use 1.0 for no weighting")
    k = design.shape[1]
    out = {
        "xtx": np.zeros((p, k * (k + 1) // 2)),
        "xty": np.zeros((p, k)),
        **{key: np.zeros(p) for key in ("yty", "ysum", "samples", "members")},
    }
    columns = np.flatnonzero(measured)
    if n == 0 or columns.size == 0:
        return out
    xc = design - design.mean(axis=0)
    out["xtx"][columns] = weight * (xc.T @ xc)[np.triu_indices(k)]
    out["samples"][columns] = float(n)
    out["members"][columns] = 1.0
    if sp.issparse(Y) or is_chunked(Y):
        _sparse_linear_pieces(Y, xc, columns, weight=weight, out=out)
        return out
    for start in range(0, columns.size, _COLUMN_BLOCK):
        block = columns[start : start + _COLUMN_BLOCK]
        # column-major, as ``Y[:, block]`` of a float64 matrix is: the sums below add in the same order
        y = (Y[:, block] if rows is None else Y[np.ix_(rows, block)]).astype(np.float64, order="F", copy=False)
        if not np.isfinite(y).all():
            bad = block[~np.isfinite(y).all(axis=0)]
            raise ValueError(
                f"Y: {bad.size} measured feature(s) hold non-finite values (first: column {int(bad[0])}); "
                "impute them or mark them False in `measured`"
            )
        total = y.sum(axis=0)
        yc = y  # centered in place (``y`` is the block's own copy): no second (samples x block) array
        yc -= total / n
        out["xty"][block] = weight * (yc.T @ xc)
        out["yty"][block] = weight * np.einsum("ij,ij->j", yc, yc)
        out["ysum"][block] = total
    return out


def _sparse_linear_pieces(Y, xc: np.ndarray, columns: np.ndarray, *, weight: float, out: dict) -> None:
    """``xty``, ``yty`` and ``ysum`` of a CSR ``Y`` from its nonzeros: ``Y'xc`` as a sparse product, and
    each feature's squares about its mean as the nonzeros' plus the zeros' (``(n - nnz) mean^2``).

    Two passes over blocks of rows (the sums, then the products about the mean), each block made float64
    as it is read: a CSR matrix's rows of about :data:`_SPARSE_BLOCK_VALUES` nonzeros (no float64 copy of
    the whole matrix), a :class:`omics.chunked.ChunkedRows` ``Y``'s blocks as it reads them from its file."""
    n, p = Y.shape

    def blocks():
        if is_chunked(Y):
            for first, part in Y.blocks():
                yield first, part.astype(np.float64)
            return
        step = csr_rows_per_block(Y, nonzeros=_SPARSE_BLOCK_VALUES)
        for first in range(0, n, step):
            yield first, Y[first : first + step].astype(np.float64)

    total, bad = np.zeros(p), np.zeros(0, dtype=int)
    for _, part in blocks():
        finite = np.isfinite(part.data)
        if not finite.all():
            bad = np.union1d(bad, np.intersect1d(np.unique(part.indices[~finite]), columns))
        total += np.bincount(part.indices, weights=part.data, minlength=p)
    if bad.size:
        raise ValueError(
            f"Y: {bad.size} measured feature(s) hold non-finite values (first: column {int(bad[0])}); "
            "impute them or mark them False in `measured`"
        )
    mean = total / n
    xty, yty, nonzeros = np.zeros((p, xc.shape[1])), np.zeros(p), np.zeros(p)
    for first, part in blocks():
        xty += np.asarray(part.T @ xc[first : first + part.shape[0]])
        yty += np.bincount(part.indices, weights=(part.data - mean[part.indices]) ** 2, minlength=p)
        nonzeros += np.bincount(part.indices, minlength=p)
    xty -= np.outer(mean, xc.sum(axis=0))
    yty += (n - nonzeros) * mean**2
    out["xty"][columns] = weight * xty[columns]
    out["yty"][columns] = weight * yty[columns]
    out["ysum"][columns] = total[columns]


def checked_pieces_inputs(
    Y: np.ndarray, design: np.ndarray, measured: np.ndarray | None, *, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Y`` (n, p; dense, or a CSR matrix kept sparse), ``design`` (n, k) and ``measured`` (p,) as
    float64/bool arrays, or a ValueError naming the argument, its shape and the fix (every site-side
    pieces function checks its inputs here). A dense float32 ``Y`` stays float32 (the callers make each block
    of columns float64 as they read it: a member's log values are never copied whole)."""
    if sp.issparse(Y):  # float32 values stay float32 (made float64 a block of rows at a time)
        Y = sp.csr_matrix(Y)
        Y = Y if Y.dtype in (np.float32, np.float64) else Y.astype(np.float64)
    elif not is_chunked(Y):  # a chunked Y is read from the file by blocks of rows, each made float64 then
        Y = np.asarray(Y)
        Y = Y if Y.dtype in (np.float32, np.float64) else Y.astype(np.float64)
    design = np.asarray(design, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (samples x features), got shape {Y.shape}; reshape it to (n, p)")
    n, p = (Y.shape[0] if rows is None else len(rows)), Y.shape[1]
    if design.ndim != 2 or design.shape[0] != n or design.shape[1] < 1:
        raise ValueError(
            f"design must be 2-D with one row per row of Y ({n}) and at least one column, got shape "
            f"{design.shape}; pass the design columns without intercept and member dummies"
        )
    if not np.isfinite(design).all():
        raise ValueError("design holds non-finite values; drop or impute those rows before computing statistics")
    measured = np.ones(p, dtype=bool) if measured is None else np.asarray(measured)
    if measured.shape != (p,) or measured.dtype != bool:
        raise ValueError(f"measured must be a bool array of shape ({p},), got {measured.dtype} {measured.shape}")
    return Y, design, measured


@dataclass(frozen=True)
class LinearModelFit:
    """Per-feature least-squares fits (limma's ``MArrayLM`` before eBayes).

    ``coefficients`` ``(p, k)`` (NaN where not estimable), ``cov_unscaled`` ``(p, k, k)`` (the inverse
    of ``Xc'Xc`` on the estimable columns, NaN elsewhere; its diagonal is limma's
    ``stdev.unscaled**2``), ``sigma`` and ``df_residual`` ``(p,)`` (``n - members - rank``; sigma is NaN
    where the df is not positive or no member measured the feature), ``amean`` (AveExpr),
    ``samples`` and ``members`` ``(p,)``.
    """

    columns: tuple[str, ...]
    coefficients: np.ndarray
    cov_unscaled: np.ndarray
    sigma: np.ndarray
    df_residual: np.ndarray
    amean: np.ndarray
    samples: np.ndarray
    members: np.ndarray

    @property
    def stdev_unscaled(self) -> np.ndarray:
        """``(p, k)`` square roots of the diagonal of ``cov_unscaled``."""
        return np.sqrt(np.diagonal(self.cov_unscaled, axis1=1, axis2=2))

    @property
    def usable(self) -> np.ndarray:
        """``(p,)`` features with a residual variance: measured somewhere and residual df > 0."""
        return np.isfinite(self.sigma)


def fit_linear_models(summed: Mapping[str, np.ndarray], *, columns: Sequence[str]) -> LinearModelFit:
    """Least-squares fit of ``y_g ~ design + member`` for every feature from the summed statistics.

    Parameters
    ----------
    summed
        The element-wise sum over members of :func:`site_linear_statistics` (keys :data:`LINEAR_KEYS`).
    columns
        The ``k`` design column names, in the members' design order.

    Returns
    -------
    LinearModelFit

    Notes
    -----
    A column aliased with earlier ones (or with the member factor, where it is constant within every
    member) is not estimable for that feature, as R's ``lm`` pivots it out: in column order, a column
    is dropped when its sum of squares left after the earlier estimable columns is at most
    :data:`ALIAS_TOLERANCE` times its own, or negligible in absolute terms (see
    :data:`NEGLIGIBLE_PER_SAMPLE`).

    Examples
    --------
    Two members' pieces, summed, give the pooled fit of ``y ~ endpoint + member``:

    >>> a = site_linear_statistics(np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([[0.0], [0.0], [1.0], [1.0]]))
    >>> b = site_linear_statistics(np.array([[2.0], [4.0], [5.0]]), np.array([[0.0], [1.0], [1.0]]))
    >>> fit = fit_linear_models({key: a[key] + b[key] for key in LINEAR_KEYS}, columns=["endpoint"])
    >>> fit.coefficients.round(6).tolist(), fit.df_residual.tolist(), fit.sigma.round(6).tolist()
    ([[2.5]], [4.0], [0.866025])
    >>> fit.members.tolist(), fit.samples.tolist()
    ([2.0], [7.0])
    """
    columns = tuple(str(c) for c in columns)
    k = len(columns)
    if k < 1 or len(set(columns)) != k:
        raise ValueError(f"columns must name the design columns uniquely, got {list(columns)}")
    missing = [key for key in LINEAR_KEYS if key not in summed]
    if missing:
        raise ValueError(
            f"summed lacks {missing}; pass the sum of site_linear_statistics outputs (found {sorted(summed)})"
        )
    s = {key: np.asarray(summed[key], dtype=np.float64) for key in LINEAR_KEYS}
    p = s["yty"].shape[0] if s["yty"].ndim == 1 else -1
    expected = {"xtx": (p, k * (k + 1) // 2), "xty": (p, k)} | {key: (p,) for key in LINEAR_KEYS[2:]}
    for key, shape in expected.items():
        if s[key].shape != shape:
            raise ValueError(
                f"summed['{key}'] has shape {s[key].shape}, expected {shape} for {k} columns; "
                "check that `columns` lists the members' design columns"
            )
    # counts are sums of exact integers: round away the CKKS noise
    members, samples = np.rint(s["members"]), np.rint(s["samples"])
    present = members > 0.5
    xtx = _gram(s["xtx"], k)
    estimable = _estimable_columns(xtx, samples) & present[:, None]
    rank = estimable.sum(axis=1)
    coefficients = np.full((p, k), np.nan)
    cov = np.full((p, k, k), np.nan)
    rss = np.full(p, np.nan)
    # one batched solve per pattern of estimable columns (few patterns: the panel x member layout)
    patterns, which = np.unique(estimable, axis=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.ravel() == index)
        keep = np.flatnonzero(pattern)
        if keep.size == 0:
            rss[rows] = s["yty"][rows]
            continue
        gram = xtx[np.ix_(rows, keep, keep)]
        # scaling to unit diagonal makes the inverse as accurate for age in days as for a 0/1 column
        unit = 1.0 / np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
        outer = unit[:, :, None] * unit[:, None, :]
        inverse = np.linalg.inv(gram * outer) * outer
        beta = np.einsum("gij,gj->gi", inverse, s["xty"][np.ix_(rows, keep)])
        coefficients[np.ix_(rows, keep)] = beta
        cov[np.ix_(rows, keep, keep)] = inverse
        rss[rows] = s["yty"][rows] - np.einsum("gi,gi->g", beta, s["xty"][np.ix_(rows, keep)])
    df_residual = np.where(present, samples - members - rank, 0.0)
    fitted = present & (df_residual > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # rounding can leave a perfect fit's residual sum of squares a hair below zero
        sigma = np.where(fitted, np.sqrt(np.maximum(rss, 0.0) / np.where(fitted, df_residual, 1.0)), np.nan)
        amean = np.where(present, s["ysum"] / samples, np.nan)
    if not present.any():
        log.warning("no feature was measured by any member")
    return LinearModelFit(columns, coefficients, cov, sigma, df_residual, amean, samples, members)


def member_variance_factor(
    Y: np.ndarray, design: np.ndarray, fit: LinearModelFit, *, measured: np.ndarray | None = None, weight: float = 1.0
) -> float:
    """This member's residual variance relative to the consortium fit: the member's next ``1/weight``.

    Run by each member on its own data with the broadcast ``fit`` (made with the members' current
    weights, ``weight`` being this member's). With the fit's coefficients the member's residual sum of
    squares for feature ``g`` has expectation ``sigma_g^2 v (n - 1 - h_g)``, ``h_g`` the member's
    share of the leverage; the moment estimate ``v = sum_g RSS_g / sigma_g^2 / sum_g (n - 1 - h_g)``
    over the features fitted and measured here is the member-level variance factor that limma's
    ``arrayWeights(var.group=member)`` estimates by REML. Refitting with ``weight = 1/v`` and
    repeating (2-3 rounds) reaches the fixed point; nothing but the result leaves the member.

    Returns
    -------
    float
        ``v``, this member's variance relative to ``fit.sigma**2`` (``1/weight`` at the fixed point).
    """
    s = site_linear_statistics(Y, design, measured=measured)
    k = len(fit.columns)
    if s["xty"].shape != fit.coefficients.shape:
        raise ValueError(
            f"design/Y give statistics of shape {s['xty'].shape} but the fit has {fit.coefficients.shape}; "
            "use the same feature panel and design columns as the fit"
        )
    use = fit.usable & (s["members"] > 0.5)
    if not use.any():
        raise ValueError("fit: no feature measured here has a residual variance; nothing to compare with")
    beta, cov, xtx = np.nan_to_num(fit.coefficients[use]), np.nan_to_num(fit.cov_unscaled[use]), _gram(s["xtx"][use], k)
    rss = s["yty"][use] - 2.0 * np.einsum("gi,gi->g", beta, s["xty"][use]) + np.einsum("gi,gij,gj->g", beta, xtx, beta)
    leverage = weight * np.einsum("gij,gji->g", cov, xtx)
    return float(np.sum(rss / fit.sigma[use] ** 2) / np.sum(s["samples"][use] - 1.0 - leverage))


def _gram(upper_triangle: np.ndarray, k: int) -> np.ndarray:
    """``(p, k, k)`` symmetric matrices from their ``np.triu_indices(k)`` upper triangles."""
    out = np.zeros((upper_triangle.shape[0], k, k))
    rows, cols = np.triu_indices(k)
    out[:, rows, cols] = upper_triangle
    out[:, cols, rows] = upper_triangle
    return out


def _estimable_columns(xtx: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """``(p, k)`` bool: R's lm pivoting on the Gram matrices, batched over features.

    A Cholesky factorization in column order that skips a column whose remaining sum of squares is
    negligible (the Gram-matrix form of the Gram-Schmidt that lm's limited pivoting performs).
    """
    p, k, _ = xtx.shape
    diag = np.diagonal(xtx, axis1=1, axis2=2)
    floor = np.minimum(ALIAS_TOLERANCE * diag.max(axis=1, initial=0.0), NEGLIGIBLE_PER_SAMPLE * samples)
    factor = np.zeros((p, k, k))
    kept = np.zeros((p, k), dtype=bool)
    for j in range(k):
        for i in range(j):
            partial = xtx[:, j, i] - np.einsum("gm,gm->g", factor[:, j, :i], factor[:, i, :i])
            with np.errstate(invalid="ignore", divide="ignore"):
                factor[:, j, i] = np.where(kept[:, i], partial / np.where(kept[:, i], factor[:, i, i], 1.0), 0.0)
        left = diag[:, j] - np.einsum("gm,gm->g", factor[:, j, :j], factor[:, j, :j])
        kept[:, j] = (left > ALIAS_TOLERANCE * diag[:, j]) & (left > floor)
        factor[:, j, j] = np.where(kept[:, j], np.sqrt(np.where(kept[:, j], left, 1.0)), 0.0)
    return kept


def top_table(
    fit: LinearModelFit, moderated: ModeratedFit, *, coef: str = "endpoint", feature_names: Sequence[str]
) -> pd.DataFrame:
    """limma's ``topTable`` for one coefficient, all features.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature, logFC, AveExpr, t, P.Value, adj.P.Val, B, members, samples``; one row per
        feature measured by at least one member and with a finite test, sorted by P.Value (ties by
        feature name). ``adj.P.Val`` is Benjamini-Hochberg over the rows kept.
    """
    j = column_index(fit, coef, "coef")
    names = np.asarray(list(feature_names), dtype=object)
    if names.shape != fit.sigma.shape:
        raise ValueError(f"feature_names has {names.size} names but the fit has {fit.sigma.size} features")
    pvalue = moderated.p_value[:, j]
    keep = (fit.members > 0.5) & np.isfinite(pvalue)
    table = pd.DataFrame(
        {
            "feature": names[keep],
            "logFC": fit.coefficients[keep, j],
            "AveExpr": fit.amean[keep],
            "t": moderated.t[keep, j],
            "P.Value": pvalue[keep],
            "adj.P.Val": stats.false_discovery_control(pvalue[keep], method="bh") if keep.any() else [],
            "B": moderated.lods[keep, j],
            "members": fit.members[keep].astype(int),
            "samples": fit.samples[keep].astype(int),
        }
    )
    return table.sort_values(["P.Value", "feature"], kind="mergesort").reset_index(drop=True)


def column_index(fit: LinearModelFit, name: str, argument: str) -> int:
    if name not in fit.columns:
        raise ValueError(f"{argument}: {name!r} is not a design column; choose one of {list(fit.columns)}")
    return fit.columns.index(name)
