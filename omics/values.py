"""What a matrix holds: raw counts or not, and which other matrix of the file holds counts when one does.

``data.values: counts`` means the platform normalizes (library size + log1p): values that are already
normalized would be normalized twice, so the contract refuses them and names the layer (or ``.raw``)
that holds the counts, with the ``members[].layer`` setting that reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from omics.layout import RAW, MemberLayout

SAMPLED = 100_000
"""Values looked at per matrix (the first ones stored): enough to tell counts from anything else."""

X_SOURCE = "X"
"""The name of ``adata.X`` among the count sources (read when a member gives no ``layer``)."""


def stored_values(matrix) -> np.ndarray:
    """The values a matrix stores, flat (a sparse matrix's non-zeros); at most :data:`SAMPLED` of them."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data[:SAMPLED])
    return np.asarray(matrix).ravel()[:SAMPLED]


def not_whole(values: np.ndarray) -> np.ndarray:
    """The values of ``values`` (finite, real) that are not whole numbers."""
    if not np.issubdtype(values.dtype, np.floating):
        return values[:0]
    return values[np.abs(values - np.rint(values)) > 1e-6 * np.maximum(1.0, np.abs(values))]


def holds_counts(matrix) -> bool:
    """Whether ``matrix`` looks like raw counts: real, finite, non-negative whole numbers (of the first
    :data:`SAMPLED` stored values), not all zero."""
    if matrix is None:
        return False
    values = stored_values(matrix)
    if values.size == 0 or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        return False
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        return False
    return bool((values >= 0).all() and (values > 0).any() and not_whole(values).size == 0)


def matrices_with_counts(adata: ad.AnnData, *, layout: MemberLayout = MemberLayout()) -> list[str]:
    """The matrices of ``adata`` that hold counts, other than the one ``layout`` reads: layer keys,
    ``"raw"`` (``adata.raw.X``) and ``"X"``, in that order, as ``members[].layer`` would name them."""
    found = [key for key in adata.layers if key != layout.layer and holds_counts(adata.layers[key])]
    if adata.raw is not None and layout.layer != RAW and holds_counts(adata.raw.X):
        found.append(RAW)
    if layout.layer is not None and holds_counts(adata.X):
        found.append(X_SOURCE)
    return found


def counts_fix(sources: Sequence[str], *, member: str = "") -> str:
    """The fix for a matrix that holds no counts although ``data.values: counts``: the setting that reads
    the counts the file holds (``sources``, from :func:`matrices_with_counts`), else what to provide."""
    whose = f" for member '{member}'" if member else ""
    if sources:
        first = sources[0]
        where = "adata.raw" if first == RAW else "X" if first == X_SOURCE else f"layers['{first}']"
        setting = "leave 'layer' out" if first == X_SOURCE else f"set `layer: {first}`"
        return (
            f"{where} of the file holds the raw counts: {setting}{whose} in consortium.yaml "
            "(members[].layer) so the platform reads them"
        )
    return (
        "provide raw counts (in X, a layer named by members[].layer, or adata.raw with `layer: raw`); round "
        "estimated counts (RSEM, salmon) to whole numbers; if the data are normalized on purpose (log values, "
        "microarray intensities), set `data.values: normalized` in consortium.yaml"
    )


def count_findings(matrix, *, sources: Sequence[str] = (), member: str = "") -> list[tuple[str, str]]:
    """``(problem, fix)`` for each way ``matrix`` (finite, real) is not raw counts: negative values, values
    that are not whole numbers; empty for counts."""
    values = stored_values(matrix)
    if np.issubdtype(values.dtype, np.floating):
        values = values[np.isfinite(values)]
    fix = counts_fix(sources, member=member)
    negative = int((values < 0).sum())
    if negative:
        shown = ", ".join(f"{v:.4g}" for v in values[values < 0][:3])
        return [(f"{negative} negative values (e.g. {shown}), but data.values: counts expects raw counts", fix)]
    fractional = not_whole(values)
    if fractional.size:
        shown = ", ".join(f"{v:.4g}" for v in fractional[:3])
        sampled = f" of the first {values.size:,} stored" if values.size == SAMPLED else ""
        return [
            (
                f"{fractional.size}{sampled} values are not whole numbers (e.g. {shown}), but data.values: counts "
                "expects raw counts; normalized values would be normalized twice",
                fix,
            )
        ]
    return []
