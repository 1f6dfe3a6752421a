"""Where a member's AnnData keeps what the platform reads: which matrix, which identifiers, which symbols.

A member names them in consortium.yaml (``members[].layer``, ``var_id_column``, ``symbol_column``);
:func:`apply_layout` turns the file into the platform's view: ``X`` the chosen matrix, ``var_names`` the
panel identifiers (Ensembl version suffixes stripped), ``var['gene_symbols']`` for display, and
``uns['layout']`` recording each choice.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd
from anndata.io import read_elem

from omics.errors import FieldError

log = logging.getLogger(__name__)

SYMBOLS = "gene_symbols"
"""The var column that carries gene symbols in the platform's view (and scanpy's usual name for it)."""
RAW = "raw"
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{11})\.\d+$")


class LayoutError(FieldError):
    """The layout named in consortium.yaml does not fit the file; ``field``, ``problem`` and ``fix`` apart."""


@dataclass(frozen=True)
class MemberLayout:
    """Which parts of a member's AnnData the platform reads (defaults: ``X`` and ``var_names``).

    Attributes
    ----------
    layer
        A key of ``adata.layers``, or ``"raw"`` for ``adata.raw.X`` with ``adata.raw.var_names``.
    var_id_column
        A ``var`` column holding the panel identifiers, instead of ``var_names``.
    symbol_column
        A ``var`` column holding gene symbols for display; by default ``gene_symbols`` when present.
    member
        The member's name, for messages.
    """

    layer: str | None = None
    var_id_column: str | None = None
    symbol_column: str | None = None
    member: str = ""


def strip_ensembl_versions(ids: pd.Index) -> tuple[pd.Index, int]:
    """``ENSG00000141510.16`` -> ``ENSG00000141510``; other identifiers unchanged. Returns the ids and
    how many were stripped."""
    ids = pd.Index(ids.astype(str))
    stripped = ids.str.replace(_ENSEMBL_VERSION, r"\1", regex=True)
    return pd.Index(stripped), int((stripped != ids).sum())


def apply_layout(adata: ad.AnnData, *, layout: MemberLayout = MemberLayout(), path: str | Path = "") -> ad.AnnData:
    """The platform's view of a member's AnnData (a new object; ``adata`` is not changed).

    Raises
    ------
    LayoutError
        The layer or a column is missing (the message lists what the file holds), or stripping Ensembl
        version suffixes makes two identifiers one.
    """
    where = _where(layout, path)
    X, var, matrix = _matrix(adata, layout, where=where, path=path)
    if layout.var_id_column is not None:
        _require_column(var, layout.var_id_column, "var_id_column", where=where, path=path, source=matrix)
        if var[layout.var_id_column].isna().any():
            n = int(var[layout.var_id_column].isna().sum())
            raise LayoutError(
                f"var.{layout.var_id_column}",
                f"{where}: {n} features have no identifier in var['{layout.var_id_column}']",
                "fill the column for every feature, or drop those features",
                path=str(path),
            )
        raw_ids = pd.Index(var[layout.var_id_column].astype(str))
    else:
        raw_ids = pd.Index(var.index.astype(str))
    ids, n_stripped = strip_ensembl_versions(raw_ids)
    if n_stripped and ids.duplicated().sum() > raw_ids.duplicated().sum():
        _refuse_collisions(raw_ids, ids, where=where, path=path)
    symbols = _symbols(var, layout, where=where, path=path)
    out_var = pd.DataFrame(index=pd.Index(ids, name=None))
    if symbols is not None:
        out_var[SYMBOLS] = symbols.where(symbols.notna(), "").astype(str).to_numpy()
    view = ad.AnnData(X=X, obs=adata.obs.copy(), var=out_var, uns=dict(adata.uns))
    view.uns["layout"] = {
        "matrix": matrix,
        "identifiers": f"var['{layout.var_id_column}']" if layout.var_id_column else "var_names",
        "versions_stripped": n_stripped,
        "symbols": f"var['{symbols.name}']" if symbols is not None else None,
    }
    if n_stripped:
        log.info("%s: stripped Ensembl version suffixes from %d identifiers", where, n_stripped)
    return view


def _where(layout: MemberLayout, path: str | Path) -> str:
    return f"member '{layout.member}' ({path})" if layout.member else str(path or "member data")


def _matrix(adata: ad.AnnData, layout: MemberLayout, *, where: str, path) -> tuple[object, pd.DataFrame, str]:
    if layout.layer is None:
        return adata.X, adata.var, "X"
    if layout.layer == RAW:
        if adata.raw is None:
            raise LayoutError(
                "layer",
                f"{where}: layer 'raw' asks for adata.raw, but the file has no .raw; its layers are "
                f"{_listing(adata.layers.keys())}",
                "name one of the layers, or leave 'layer' out to read X",
                path=str(path),
            )
        var = adata.raw.var.copy()
        for column in adata.var.columns.difference(var.columns):  # e.g. symbols kept only in var
            var[column] = adata.var[column].reindex(var.index).to_numpy()
        return adata.raw.X, var, "raw.X"
    if layout.layer not in adata.layers:
        raw = " and a .raw" if adata.raw is not None else ""
        raise LayoutError(
            "layer",
            f"{where}: no layer '{layout.layer}'; the file holds layers {_listing(adata.layers.keys())}{raw}",
            "set 'layer' to one of those (or 'raw'), or leave it out to read X",
            path=str(path),
        )
    return adata.layers[layout.layer], adata.var, f"layers['{layout.layer}']"


def _require_column(var: pd.DataFrame, column: str, option: str, *, where: str, path, source: str) -> None:
    if column not in var.columns:
        table = "raw.var" if source == "raw.X" else "var"
        raise LayoutError(
            f"var.{column}",
            f"{where}: {option} '{column}' is not a column of {table}; its columns are {_listing(var.columns)}",
            f"set {option} to one of those, or leave it out",
            path=str(path),
        )


def _refuse_collisions(raw_ids: pd.Index, ids: pd.Index, *, where: str, path) -> None:
    clash = ids[ids.duplicated(keep=False) & ~raw_ids.duplicated(keep=False)]
    first = clash[0]
    versions = sorted(raw_ids[ids == first])
    raise LayoutError(
        "var_names",
        f"{where}: stripping Ensembl version suffixes makes {clash.nunique()} identifiers collide, e.g. "
        f"{versions} -> '{first}'",
        "keep one version of each gene (or sum them) before joining",
        path=str(path),
    )


def _symbols(var: pd.DataFrame, layout: MemberLayout, *, where: str, path) -> pd.Series | None:
    if layout.symbol_column is not None:
        _require_column(var, layout.symbol_column, "symbol_column", where=where, path=path, source="var")
        return var[layout.symbol_column]
    return var[SYMBOLS] if SYMBOLS in var.columns else None


def _listing(items) -> str:
    items = [str(i) for i in items]
    return "[" + ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "") + "]"


def read_symbols(path: str | Path, *, layout: MemberLayout = MemberLayout()) -> pd.Series:
    """Gene symbols of a member's file by panel identifier (version suffixes stripped); empty without a
    symbol column. Reads only ``var`` (or ``raw/var``), never the matrix.

    Raises
    ------
    LayoutError
        A column the layout names is missing.
    """
    with h5py.File(path, "r") as handle:
        var = read_elem(handle["raw/var"]) if layout.layer == RAW and "raw/var" in handle else read_elem(handle["var"])
    if layout.var_id_column is not None:
        _require_column(var, layout.var_id_column, "var_id_column", where=_where(layout, path), path=path, source="var")
        var = var.set_index(layout.var_id_column)
    symbols = _symbols(var, layout, where=_where(layout, path), path=path)
    if symbols is None:
        return pd.Series(dtype=str, name=SYMBOLS)
    ids, _ = strip_ensembl_versions(pd.Index(var.index))
    found = pd.Series(symbols.to_numpy(), index=ids, name=SYMBOLS).dropna().astype(str)
    return found[~found.index.duplicated()]


def with_symbols(table: pd.DataFrame, symbols: pd.Series | dict, *, feature_column: str = "feature") -> pd.DataFrame:
    """``table`` with a ``symbol`` column after ``feature_column`` ('' where no symbol is known), for display."""
    lookup = pd.Series(symbols, dtype=object) if isinstance(symbols, dict) else symbols
    out = table.drop(columns="symbol", errors="ignore")
    position = list(out.columns).index(feature_column) + 1
    values = out[feature_column].astype(str).map(lookup).fillna("").astype(str)
    out.insert(position, "symbol", values.to_numpy())
    return out
