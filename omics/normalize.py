"""Normalization with numpy: library size + log1p for counts, then per-feature scaling.

The steps are scanpy's ``normalize_total``, ``log1p`` and ``scale`` (same results), written with numpy so
that a member's FLARE process does not import scanpy (seconds of start-up and a large dependency tree
for three lines of arithmetic).

The parameters, and the per-feature statistics a member may share (mean and standard deviation of
the log values, never raw values), are recorded in ``uns['normalization']`` and ``var``; the log-scale
values before scaling are kept in ``layers['log']``.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np

log = logging.getLogger(__name__)

TARGET_SUM = 1e4  # counts per sample after library-size normalization (scanpy's usual choice)
MAX_VALUE = 10.0  # scaled values are clipped to [-MAX_VALUE, MAX_VALUE]


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
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float32)
    steps = []
    if values == "counts":
        X = np.log1p(library_size_normalized(X, target_sum=target_sum))
        steps += [f"normalize_total(target_sum={target_sum:g})", "log1p"]
    # the log-scale values before scaling: what association statistics and fold changes are computed on
    adata.layers["log"] = np.array(X, dtype=np.float32, copy=True)
    adata.X = X
    rows = np.ones(adata.n_obs, dtype=bool) if fit_rows is None else np.asarray(fit_rows, dtype=bool)
    if rows.shape != (adata.n_obs,) or rows.sum() < 2:
        raise ValueError(f"fit_rows must mark at least 2 of the {adata.n_obs} samples, got {int(rows.sum())}")
    fit = adata.X[rows]
    mean = fit.mean(axis=0)
    std = fit.std(axis=0, ddof=1)
    adata.var["norm_mean"] = mean.astype(np.float32)
    adata.var["norm_std"] = std.astype(np.float32)
    # as scanpy's scale: a constant feature is centred, not divided by 0
    adata.X = np.clip((adata.X - mean) / np.where(std > 0, std, 1.0), -max_value, max_value).astype(np.float32)
    steps.append(f"scale(zero_center=True, max_value={max_value:g}, fitted on {int(rows.sum())} samples)")
    adata.uns["normalization"] = {
        "values": values,
        "target_sum": target_sum,
        "max_value": max_value,
        "fitted_on": "train split" if fit_rows is not None else "all samples",
        "steps": steps,
    }
    log.info("normalized %d x %d: %s", adata.n_obs, adata.n_vars, ", ".join(steps))
    return adata if copy else None


def library_size_normalized(X: np.ndarray, *, target_sum: float) -> np.ndarray:
    """Each sample scaled to ``target_sum`` counts (scanpy's ``normalize_total``); a sample without
    counts stays 0. A new float32 array."""
    totals = X.sum(axis=1, dtype=np.float64, keepdims=True)
    totals[totals == 0] = 1.0
    return (X / totals * target_sum).astype(np.float32)
