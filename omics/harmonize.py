"""Harmonization of a member's features to the consortium panel.

Panel order is imposed, features outside the panel are dropped and counted, and panel features the
member did not measure are recorded in ``var['measured']`` (False) and ``uns['harmonization']``. Their
values are set to 0 after scaling, i.e. to the feature's mean, which contributes nothing to a linear
layer's input shift; nothing is zero-padded without that record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from omics.errors import ContractError

log = logging.getLogger(__name__)

_COLUMN_BLOCK = 2048  # features copied into panel order at a time


def harmonize_to_panel(adata: ad.AnnData, *, panel: Sequence[str], min_coverage: float = 0.0) -> ad.AnnData:
    """A new AnnData with ``var_names == panel`` and a ``var['measured']`` mask.

    Raises
    ------
    ContractError
        Coverage of the panel is below ``min_coverage``.
    """
    panel_index = pd.Index(list(panel), dtype=str)
    names = adata.var_names.astype(str)
    measured = panel_index.isin(names)
    coverage = float(measured.mean()) if len(panel_index) else 1.0  # an empty panel (clinical inputs only)
    if coverage < min_coverage:
        raise ContractError(
            f"the data covers {coverage:.1%} of the {len(panel_index)}-feature panel, below the required "
            f"{min_coverage:.0%}; measure more panel features or check identifiers"
        )
    positions = pd.Index(names).get_indexer(panel_index[measured])

    def to_panel(matrix) -> np.ndarray:
        if sp.issparse(matrix):  # CSR stays CSR: its columns renumbered in panel order
            matrix = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
            if measured.all() and np.array_equal(positions, np.arange(matrix.shape[1])):
                return matrix.astype(np.float32, copy=False)  # already the panel, in order: no copy
            picked = matrix[:, positions].astype(np.float32, copy=False)
            picked.sort_indices()
            columns = np.flatnonzero(measured).astype(picked.indices.dtype)
            return sp.csr_matrix(
                (picked.data, columns[picked.indices], picked.indptr), shape=(adata.n_obs, len(panel_index))
            )
        matrix = np.asarray(matrix, dtype=np.float32)
        if measured.all() and np.array_equal(positions, np.arange(matrix.shape[1])):
            return matrix  # already the panel, in order: no copy
        out = np.zeros((adata.n_obs, len(panel_index)), dtype=np.float32)
        targets = np.flatnonzero(measured)
        for start in range(0, targets.size, _COLUMN_BLOCK):  # no second matrix-sized temporary
            out[:, targets[start : start + _COLUMN_BLOCK]] = matrix[:, positions[start : start + _COLUMN_BLOCK]]
        return out

    X = to_panel(adata.X)
    # a sparse member's log layer is its X (omics.normalize): one matrix, not two
    layers = {name: X if layer is adata.X else to_panel(layer) for name, layer in adata.layers.items()}
    var = pd.DataFrame(index=panel_index)
    var["measured"] = measured
    for column in adata.var.columns:
        var[column] = adata.var[column].reindex(panel_index).to_numpy()
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=var, uns=dict(adata.uns), layers=layers)
    missing = panel_index[~measured]
    out.uns["harmonization"] = {
        "panel_size": int(len(panel_index)),
        "coverage": coverage,
        "n_unmeasured": int((~measured).sum()),
        "unmeasured_examples": [str(x) for x in missing[:20]],
        "n_dropped_outside_panel": int((~pd.Index(names).isin(panel_index)).sum()),
        "unmeasured_fill": "0 after scaling (the feature mean); see var['measured']",
    }
    log.info(
        "harmonized to panel: coverage %.1f%%, %d unmeasured, %d dropped",
        100 * coverage,
        (~measured).sum(),
        out.uns["harmonization"]["n_dropped_outside_panel"],
    )
    return out
