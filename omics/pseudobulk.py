"""Pseudobulk: a single-cell member's counts summed per sample (donor) before normalization.

Cells of one donor are not independent replicates; summing them makes the sample, not the cell, the
unit of every statistic downstream. The sum is a sparse indicator matrix (samples x cells) times the
counts, so a sparse cells x genes matrix is never densified; a dense one is summed in row blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from omics.errors import FieldError

log = logging.getLogger(__name__)

N_CELLS = "n_cells"
"""The obs column of the result holding how many cells each sample's sum is made of."""
# values converted to float64 at once (32 MiB) when checking and summing: bounds the working copies
_BLOCK_ELEMENTS = 2**22
_LAYER_FIX = (
    "pseudobulk sums raw counts: if the file keeps them in a layer or in .raw, name it with 'layer:' for "
    "this member in consortium.yaml (e.g. 'layer: counts' or 'layer: raw')"
)


class PseudobulkError(FieldError):
    """The cells cannot be summed per sample as asked; ``field``, ``problem`` and ``fix`` apart."""


def pseudobulk(
    adata: ad.AnnData,
    *,
    sample_column: str,
    cell_type_column: str | None = None,
    cell_type: str | None = None,
    required_columns: Sequence[str] = (),
    path: str = "",
) -> ad.AnnData:
    """Sum a single-cell member's counts per sample.

    Parameters
    ----------
    adata
        Cells x features of counts (``X`` dense or scipy sparse), e.g. the view of
        :func:`omics.layout.apply_layout`.
    sample_column
        The ``obs`` column naming each cell's sample (donor).
    cell_type_column, cell_type
        Keep only the cells whose ``obs[cell_type_column]`` is ``cell_type`` (compared as text).
    required_columns
        ``obs`` columns the caller needs per sample (endpoints, covariates): an error if one varies
        within a sample instead of being dropped.
    path
        The member's file, for messages.

    Returns
    -------
    AnnData
        One row per sample in order of first appearance (``obs_names`` the sample ids as text), float64
        dense ``X``, ``var`` copied; ``obs`` carries every column that is constant within each sample and
        ``n_cells``. ``uns['pseudobulk']`` records the parameters and the dropped columns.

    Raises
    ------
    PseudobulkError
        A column is missing, no cell is of ``cell_type``, a cell has no sample, ``X`` is not counts, or a
        required column varies within a sample.
    """
    obs = adata.obs.drop(columns=N_CELLS, errors="ignore")  # recounted below
    for column in [sample_column, *([cell_type_column] if cell_type is not None else []), *required_columns]:
        _require_column(obs, column, path=path)
    keep = np.ones(adata.n_obs, dtype=bool)
    if cell_type is not None:
        keep = _cells_of_type(obs, cell_type_column, cell_type, path=path)
    obs = obs[keep]
    samples = obs[sample_column]
    if samples.isna().any():
        first = str(obs.index[np.flatnonzero(samples.isna().to_numpy())[0]])
        raise PseudobulkError(
            f"obs.{sample_column}",
            f"{int(samples.isna().sum())} cells have no sample (first: '{first}')",
            f"give every cell its sample in obs['{sample_column}'], or drop the cells without one",
            path=path,
        )
    codes, uniques = pd.factorize(samples, sort=False)  # order of first appearance
    names = pd.Index([str(u) for u in uniques])
    if not names.is_unique:
        raise PseudobulkError(
            f"obs.{sample_column}",
            f"sample ids {sorted(names[names.duplicated()].unique())[:5]} are one id written two ways",
            "write each sample id one way (e.g. all as text)",
            path=path,
        )
    cells = np.flatnonzero(keep)
    counts = _require_counts(adata.X, cells, path=path)
    summed = _sum_by_sample(counts, cells, codes, len(names))
    sample_obs, dropped = _sample_level_obs(obs, codes, names, required_columns=required_columns, path=path)
    sample_obs[N_CELLS] = np.bincount(codes, minlength=len(names)).astype(np.int64)
    if dropped:
        log.info("%s: obs columns that vary within a sample were dropped: %s", path or "member data", dropped)
    uns = dict(adata.uns)
    uns["pseudobulk"] = {
        "sample_column": sample_column,
        "cell_type_column": cell_type_column,
        "cell_type": cell_type,
        "cells": int(keep.sum()),
        "dropped_columns": dropped,
    }
    return ad.AnnData(X=summed, obs=sample_obs, var=adata.var.copy(), uns=uns)


def _require_column(obs: pd.DataFrame, column: str | None, *, path: str) -> None:
    if column is None:
        raise PseudobulkError(
            "cell_type_column",
            "a cell type is given but no column to find it in",
            "name the obs column of cell types with cell_type_column",
            path=path,
        )
    if column not in obs.columns:
        found = [str(c) for c in obs.columns]
        more = f", ... ({len(found)} in all)" if len(found) > 10 else ""
        raise PseudobulkError(
            f"obs.{column}",
            f"pseudobulk needs column '{column}' in obs; found: [{', '.join(found[:10])}{more}]",
            f"add '{column}' to obs, or correct the column name in consortium.yaml",
            path=path,
        )


def _cells_of_type(obs: pd.DataFrame, column: str, cell_type: str, *, path: str) -> np.ndarray:
    values = obs[column].astype(str)
    keep = (values == str(cell_type)).to_numpy()
    if not keep.any():
        present = list(pd.unique(values))
        more = f", ... ({len(present)} in all)" if len(present) > 10 else ""
        raise PseudobulkError(
            f"obs.{column}",
            f"no cell has cell type '{cell_type}'; the column holds [{', '.join(present[:10])}{more}]",
            f"set the cell type to one of those, or check the column '{column}'",
            path=path,
        )
    return keep


def _require_counts(X, cells: np.ndarray, *, path: str):
    """The matrix to sum: CSR restricted to ``cells`` when sparse, else ``X`` itself (read in row blocks).

    Raises
    ------
    PseudobulkError
        The kept cells' values are not counts (negative, non-integer, NaN or infinite).
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X = X if np.array_equal(cells, np.arange(X.shape[0])) else X[cells]  # every cell kept: no copy
        blocks = (X.data[i : i + _BLOCK_ELEMENTS] for i in range(0, X.data.size, _BLOCK_ELEMENTS))
    else:
        X = np.asarray(X)
        blocks = (block for _, block in _row_blocks(X, cells))
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise PseudobulkError("X", f"dtype {X.dtype} is not a number type", _LAYER_FIX, path=path)
    negative = non_integer = non_finite = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        finite = block[np.isfinite(block)]
        non_finite += block.size - finite.size
        negative += int((finite < 0).sum())
        non_integer += int((finite != np.round(finite)).sum())
    if non_finite or negative or non_integer:
        raise PseudobulkError(
            "X",
            f"X is not counts: {negative} negative, {non_integer} non-integer and {non_finite} NaN or infinite values",
            _LAYER_FIX,
            path=path,
        )
    return X


def _sum_by_sample(X, cells: np.ndarray, codes: np.ndarray, n_samples: int) -> np.ndarray:
    """Samples x features sums: a sparse samples x cells indicator times the counts."""
    indicator = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float64), (codes, np.arange(len(codes)))), shape=(n_samples, len(codes))
    )
    summed = np.zeros((n_samples, X.shape[1]), dtype=np.float64)
    if sp.issparse(X):  # already restricted to the kept cells; float64 a block of cells at a time, not whole
        rows = max(1, _BLOCK_ELEMENTS // max(1, int(X.nnz / max(1, X.shape[0]))))
        for start in range(0, X.shape[0], rows):
            summed += (indicator[:, start : start + rows] @ X[start : start + rows].astype(np.float64)).toarray()
        return summed
    for start, block in _row_blocks(X, cells):
        summed += indicator[:, start : start + len(block)] @ block
    return summed


def _row_blocks(X: np.ndarray, cells: np.ndarray):
    """``(offset into cells, float64 rows)`` of a dense matrix, about ``_BLOCK_ELEMENTS`` values at a time."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, X.shape[1]))
    for start in range(0, len(cells), rows):
        yield start, np.asarray(X[cells[start : start + rows]], dtype=np.float64)


def _sample_level_obs(
    obs: pd.DataFrame, codes: np.ndarray, names: pd.Index, *, required_columns: Sequence[str], path: str
) -> tuple[pd.DataFrame, list[str]]:
    """The obs columns constant within every sample, one row per sample; and the names of the others."""
    first_rows = np.unique(codes, return_index=True)[1]  # codes count up in order of first appearance
    distinct = obs.groupby(codes, sort=True, observed=True).nunique(dropna=False)
    varies = [str(c) for c in obs.columns if (distinct[c] > 1).any()]
    for column in required_columns:
        if column in varies:
            first = names[int(np.flatnonzero(distinct[column].to_numpy() > 1)[0])]
            values = pd.unique(obs[column][codes == names.get_loc(first)])
            raise PseudobulkError(
                f"obs.{column}",
                f"'{column}' varies within sample '{first}' (values {[str(v) for v in values[:5]]}), but it is "
                "needed per sample",
                f"make '{column}' a sample-level column (one value per sample), or drop it from the tasks and "
                "covariates",
                path=path,
            )
    carried = obs.iloc[first_rows][[c for c in obs.columns if str(c) not in varies]].copy()
    carried.index = names
    return carried, varies
