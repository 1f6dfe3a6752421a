"""Normalization with numpy: library size + log1p for counts, then per-feature scaling.

The steps are scanpy's ``normalize_total``, ``log1p`` and ``scale`` (same results), written with numpy so
that a member's FLARE process does not import scanpy (seconds of start-up and a large dependency tree
for three lines of arithmetic).

The parameters, and the per-feature statistics a member may share (mean and standard deviation of
the log values, never raw values), are recorded in ``uns['normalization']`` and ``var``; the log-scale
values before scaling are kept in ``layers['log']``.

A CSR matrix stays sparse: library size and ``log1p`` change only its nonzeros (a block of rows at a
time), the scaling's mean and SD come from the nonzeros, and the scaling itself (dense by nature) is left
to whoever reads rows (``uns['normalization']['scaled']`` is False; the models layer's ``ScaledRows``).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scipy.sparse as sp

from omics.chunked import csr_rows_per_block, is_chunked

log = logging.getLogger(__name__)

TARGET_SUM = 1e4  # counts per sample after library-size normalization (scanpy's usual choice)
MAX_VALUE = 10.0  # scaled values are clipped to [-MAX_VALUE, MAX_VALUE]
_NONZEROS_PER_BLOCK = 2**22  # a sparse matrix's nonzeros normalized at a time


def normalize(
    adata: ad.AnnData,
    *,
    values: str = "counts",
    target_sum: float = TARGET_SUM,
    max_value: float = MAX_VALUE,
    fit_rows: np.ndarray | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Normalize ``adata.X`` in place (or on a copy) and record how.

    Parameters
    ----------
    values
        ``"counts"``: library-size normalization to ``target_sum`` and ``log1p`` first;
        ``"normalized"``: the values are already on a log scale and are only scaled.
    max_value
        Scaled values are clipped to ``[-max_value, max_value]``.
    fit_rows
        Boolean mask of the samples whose mean and standard deviation define the scaling (the
        training split, so that validation and test samples never shape it); default: all samples.
        Library-size normalization and log1p are per sample and need no fit.
    """
    adata = adata.copy() if copy else adata
    sparse = sp.issparse(adata.X)
    if sparse:  # CSR stays CSR: library size and log1p touch only the nonzeros
        X = adata.X if sp.isspmatrix_csr(adata.X) else sp.csr_matrix(adata.X)
        X = X if X.dtype == np.float32 else X.astype(np.float32)
    else:
        X = np.asarray(adata.X, dtype=np.float32)
    steps = []
    if values == "counts":
        X = log_values(X, values=values, target_sum=target_sum)
        steps += [f"normalize_total(target_sum={target_sum:g})", "log1p"]
    # the log-scale values before scaling: what association statistics and fold changes are computed on
    # (a sparse member's layer and X are one matrix: it is scaled as rows are read, never here)
    # (library size + log1p made a new array; "normalized" values are copied, never the caller's array)
    fresh = sparse or values == "counts"
    adata.layers["log"] = X if fresh else np.array(X, dtype=np.float32, copy=True)
    adata.X = adata.layers["log"]
    rows = np.ones(adata.n_obs, dtype=bool) if fit_rows is None else np.asarray(fit_rows, dtype=bool)
    if rows.shape != (adata.n_obs,) or rows.sum() < 2:
        raise ValueError(f"fit_rows must mark at least 2 of the {adata.n_obs} samples, got {int(rows.sum())}")
    mean, std = column_mean_std(X, rows)
    adata.var["norm_mean"] = mean.astype(np.float32)
    adata.var["norm_std"] = std.astype(np.float32)
    if not sparse:
        adata.X = scale_features(adata.X, mean=mean, std=std, max_value=max_value)
    steps.append(f"scale(zero_center=True, max_value={max_value:g}, fitted on {int(rows.sum())} samples)")
    adata.uns["normalization"] = {
        "values": values,
        "target_sum": target_sum,
        "max_value": max_value,
        "fitted_on": "train split" if fit_rows is not None else "all samples",
        "steps": steps,
        # sparse: X holds the log values and is scaled per block of rows (models.data.ScaledRows)
        "scaled": not sparse,
    }
    log.info("normalized %d x %d: %s", adata.n_obs, adata.n_vars, ", ".join(steps))
    return adata if copy else None


def column_mean_std(X, rows: np.ndarray, *, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-column mean and SD (``ddof=1``) of ``X``'s rows marked in ``rows``; a CSR matrix (or a
    :class:`omics.chunked.ChunkedRows`, read from the file) is read one block of rows at a time from its
    nonzeros (two passes, the SD about the mean, as numpy's).

    >>> X = np.array([[0.0, 1.0], [2.0, 0.0], [4.0, 3.0]])
    >>> [v.round(4).tolist() for v in column_mean_std(sp.csr_matrix(X), np.array([True, True, True]))]
    [[2.0, 1.3333], [2.0, 1.5275]]
    """
    rows = np.asarray(rows, dtype=bool)
    n = int(rows.sum())
    if is_chunked(X):  # a member read from its file: only the fitted rows are read, a block at a time
        X, rows, block = X.take(np.flatnonzero(rows)), np.ones(n, dtype=bool), X.source.block_rows
    elif not sp.issparse(X):  # a block of columns at a time: no float64 copy of the fitted rows
        X, mean, std = np.asarray(X), np.empty(X.shape[1]), np.empty(X.shape[1])
        step = max(1, _NONZEROS_PER_BLOCK // max(1, n))
        for start in range(0, X.shape[1], step):
            fit = X[:, start : start + step][rows]
            mean[start : start + step] = fit.mean(axis=0, dtype=np.float64)
            std[start : start + step] = fit.std(axis=0, ddof=1, dtype=np.float64)
        return mean, std
    p = X.shape[1]
    total, squares, nonzeros = np.zeros(p), np.zeros(p), np.zeros(p)

    def blocks():  # the fitted rows, one block at a time (never a copy of all of them)
        for start in range(0, X.shape[0], block):
            yield X[start : start + block][rows[start : start + block]]

    for part in blocks():
        total += np.bincount(part.indices, weights=part.data.astype(np.float64), minlength=p)
    mean = total / n
    for part in blocks():
        squares += np.bincount(
            part.indices, weights=(part.data.astype(np.float64) - mean[part.indices]) ** 2, minlength=p
        )
        nonzeros += np.bincount(part.indices, minlength=p)
    squares += (n - nonzeros) * mean**2  # the zeros' squared distances from the mean
    return mean, np.sqrt(squares / (n - 1))


def library_size_normalized(X: np.ndarray, *, target_sum: float) -> np.ndarray:
    """Each sample scaled to ``target_sum`` counts (scanpy's ``normalize_total``); a sample without
    counts stays 0. A new float32 array."""
    totals = X.sum(axis=1, dtype=np.float64, keepdims=True)
    totals[totals == 0] = 1.0
    return _divided(X, totals, target_sum=target_sum)


def _divided(X: np.ndarray, totals: np.ndarray, *, target_sum: float) -> np.ndarray:
    """``(X / totals * target_sum)`` as float32, computed in float64 a block of rows at a time (the same
    arithmetic; no float64 copy of the whole matrix)."""
    out = np.empty(X.shape, dtype=np.float32)
    step = max(1, _NONZEROS_PER_BLOCK // max(1, X.shape[1]))
    for start in range(0, X.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = X[rows] / totals[rows] * target_sum
    return out


def log_values(
    X: np.ndarray, *, values: str, target_sum: float = TARGET_SUM, library_size: np.ndarray | None = None
) -> np.ndarray:
    """The log-scale values the per-feature scaling works on: for ``values="counts"`` library size to
    ``target_sum`` and ``log1p``; ``"normalized"`` values are returned as they are (float32).

    ``library_size``: each sample's total counts over all the features its file holds (default: the sum
    of ``X``'s rows), so that a sample scored on the panel's features alone is normalized as in training.
    """
    if sp.issparse(X):
        return _sparse_log_values(X, values=values, target_sum=target_sum, library_size=library_size)
    X = np.asarray(X, dtype=np.float32)
    if values != "counts":
        return X
    if library_size is None:
        normalized = library_size_normalized(X, target_sum=target_sum)
    else:
        totals = np.asarray(library_size, dtype=np.float64).reshape(-1, 1)
        normalized = _divided(X, np.where(totals > 0, totals, 1.0), target_sum=target_sum)
    return np.log1p(normalized, out=normalized)  # a new array already: log1p in place


def _sparse_log_values(X, *, values: str, target_sum: float, library_size: np.ndarray | None) -> sp.csr_matrix:
    # the dense arithmetic on the nonzeros only (a zero stays zero), sharing the CSR's index arrays
    X = X if sp.isspmatrix_csr(X) else sp.csr_matrix(X)
    X = X if X.dtype == np.float32 else X.astype(np.float32)
    if values != "counts":
        return X
    given = None if library_size is None else np.asarray(library_size, dtype=np.float64).reshape(-1)
    data = np.empty(X.data.shape, dtype=np.float32)
    step = csr_rows_per_block(X, nonzeros=_NONZEROS_PER_BLOCK)
    for start in range(0, X.shape[0], step):  # float64 intermediates for a block of rows, not for every nonzero
        stop = min(start + step, X.shape[0])
        first, last = X.indptr[start], X.indptr[stop]
        values = X.data[first:last].astype(np.float64)
        lengths = np.diff(X.indptr[start : stop + 1])
        rows = np.repeat(np.arange(stop - start), lengths)
        totals = np.bincount(rows, weights=values, minlength=stop - start) if given is None else given[start:stop]
        totals = np.where(totals > 0, totals, 1.0)
        data[first:last] = np.log1p((values / totals[rows] * target_sum).astype(np.float32))
    return sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)


def scale_features(X: np.ndarray, *, mean: np.ndarray, std: np.ndarray, max_value: float = MAX_VALUE) -> np.ndarray:
    """Centre and scale each feature with fixed statistics (a training split's), clipped to
    ``[-max_value, max_value]``; as scanpy's ``scale``, a constant feature is centred, not divided by 0.
    Each sample's result depends on that sample and the statistics only."""
    std = np.asarray(std, dtype=np.float32)
    scaled = np.subtract(np.asarray(X, dtype=np.float32), np.asarray(mean, dtype=np.float32), dtype=np.float32)
    np.divide(scaled, np.where(std > 0, std, np.float32(1.0)), out=scaled)  # in place: one new array in all
    return np.clip(scaled, -max_value, max_value, out=scaled)
