"""A member too large for memory prepared from its file: :func:`omics.prepare.prepare_member` in passes.

obs and var are small and read whole; the matrix is never held. The contract's value checks, the
normalization's training-split mean and SD and (later) the statistics read it a block of rows at a time
through :class:`omics.chunked.ChunkedRows`, which also serves the network's rows. The prepared AnnData
carries everything :func:`omics.prepare.prepare_member`'s does except ``X`` (``None``): its var
(``measured``, ``norm_mean``, ``norm_std``), ``uns['normalization']``, ``uns['harmonization']``, the
split and the clinical inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from omics.chunked import ChunkedRows, H5Matrix
from omics.contract import ContractReport, ContractRules, check_view
from omics.errors import DataFileError
from omics.harmonize import harmonize_to_panel
from omics.io import check_member_file, read_stored_split
from omics.layout import RAW, LayoutError, MemberLayout, apply_layout
from omics.normalize import MAX_VALUE, TARGET_SUM, column_mean_std
from omics.prepare import add_clinical, checked_split, clinical_inputs, task_targets
from omics.split import split_file

log = logging.getLogger(__name__)


def matrix_group(layout: MemberLayout = MemberLayout()) -> str:
    """Where the matrix ``layout`` reads is stored in the ``.h5ad`` file."""
    if layout.layer is None:
        return "X"
    return "raw/X" if layout.layer == RAW else f"layers/{layout.layer}"


def prepare_member_in_chunks(
    path: str | Path,
    *,
    tasks: Sequence[Any],
    rules: ContractRules,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int | None = None,
    layout: MemberLayout = MemberLayout(),
) -> tuple[ad.AnnData, ChunkedRows]:
    """:func:`omics.prepare.prepare_member` for the member's file at ``path``, its matrix read by rows.

    Returns the prepared AnnData (``X`` is ``None``) and the reader of its log values in panel order
    (the clinical inputs, unscaled, after them: what ``models.data.ScaledRows`` reads).

    Raises
    ------
    DataFileError
        The file is missing, truncated or its matrix is not a CSR matrix or a dense 2-D array.
    ContractError
        The data is not fit to join (the message lists every error with its fix).
    """
    path = Path(path)
    check_member_file(path)
    view = apply_layout(_skeleton(path), layout=layout, path=path)
    source = _source(path, layout, rows=view.n_obs)
    train = checked_split(
        view,
        tasks=tasks,
        rules=rules,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        folds=folds,
        fold=fold,
        path=str(path),
        stored=source,
    )
    panel = pd.Index([str(f) for f in rules.panel])
    names = pd.Index(view.var_names.astype(str))
    columns = names.get_indexer(panel)  # the file column of each panel feature, -1 where it has none
    reader = ChunkedRows(source, columns=columns, values=rules.values, target_sum=TARGET_SUM)
    if train.sum() < 2:
        raise ValueError(f"fit_rows must mark at least 2 of the {view.n_obs} samples, got {int(train.sum())}")
    mean, std = column_mean_std(reader, train)
    in_file = columns >= 0
    for name, value in (("norm_mean", mean), ("norm_std", std)):  # by file column, as normalize() leaves var
        column = np.full(view.n_vars, np.nan, dtype=np.float32)
        column[columns[in_file]] = value[in_file]
        view.var[name] = column
    view.uns["normalization"] = _normalization(rules.values, fitted=int(train.sum()), source=source)
    if not len(panel):  # a clinical-only consortium: the file's features are no input
        view = view[:, []].copy()
    # X is the skeleton's empty matrix: harmonization reads the names only, then X is dropped
    prepared = harmonize_to_panel(view, panel=panel, min_coverage=rules.min_coverage)
    prepared.X = None
    if rules.clinical:
        add_clinical(prepared, clinical=rules.clinical, fit_rows=train, path=str(path))
        values = clinical_inputs(prepared)[0].astype(np.float32)
        reader = ChunkedRows(source, columns=columns, values=rules.values, target_sum=TARGET_SUM, extra=values)
    return prepared, reader


def check_member_in_chunks(
    path: str | Path, *, tasks: Sequence[Any], rules: ContractRules, layout: MemberLayout = MemberLayout()
) -> tuple[ContractReport, ad.AnnData]:
    """:func:`omics.contract.check_member` of the member's file at ``path``, its values read a block of
    rows at a time; returns the report and the file's obs and var (an AnnData without values)."""
    path = Path(path)
    check_member_file(path)
    skeleton = _skeleton(path)
    try:
        view = apply_layout(skeleton, layout=layout, path=path)
    except LayoutError as exc:
        report = ContractReport(path=str(path), n_samples=skeleton.n_obs, n_features=skeleton.n_vars)
        report.error(exc.field, exc.problem, exc.fix)
        return report, skeleton
    source = _source(path, layout, rows=view.n_obs)
    return check_view(view, tasks=tasks, rules=rules, path=path, stored=source, member=layout.member), skeleton


def chunked_member_arrays(prepared: ad.AnnData, reader: ChunkedRows, *, tasks: Sequence[Any]) -> dict[str, Any]:
    """:func:`omics.prepare.member_arrays` (``scaled=False``) of a member prepared in chunks: ``X`` is the
    reader of its log values (the clinical inputs after them)."""
    names = [str(x) for x in prepared.var_names] + list(prepared.uns.get("clinical", {}).get("names", []))
    return {
        "X": reader,
        "targets": {task.name: task_targets(prepared.obs, task) for task in tasks},
        "split": prepared.obs["split"].astype(str).to_numpy(),
        "feature_names": names,
    }


def _normalization(values: str, *, fitted: int, source: H5Matrix) -> dict[str, Any]:
    steps = [f"normalize_total(target_sum={TARGET_SUM:g})", "log1p"] if values == "counts" else []
    steps.append(f"scale(zero_center=True, max_value={MAX_VALUE:g}, fitted on {fitted} samples)")
    log.info("normalized %d x %d in chunks from %s: %s", *source.shape, source.path, ", ".join(steps))
    return {
        "values": values,
        "target_sum": TARGET_SUM,
        "max_value": MAX_VALUE,
        "fitted_on": "train split",
        "steps": steps,
        "scaled": False,  # scaled per block of rows as they are read (models.data.ScaledRows)
        "read": "chunks",
    }


def _source(path: Path, layout: MemberLayout, *, rows: int) -> H5Matrix:
    source = H5Matrix(path, group=matrix_group(layout))
    if source.shape[0] != rows:
        raise DataFileError(f"{path}: '{source.group}' has {source.shape[0]} rows but obs has {rows}; re-export it")
    return source


def _skeleton(path: Path) -> ad.AnnData:
    """The member's obs, var, layer names and .raw with empty matrices in place of the values, for
    :func:`omics.layout.apply_layout`: which matrix and identifiers the layout reads, with its errors."""
    try:
        with h5py.File(path, "r") as handle:
            obs, var = read_elem(handle["obs"]), read_elem(handle["var"])
            layers = list(handle["layers"].keys()) if "layers" in handle else []
            raw_var = read_elem(handle["raw/var"]) if "raw" in handle and "raw/var" in handle else None
    except (OSError, KeyError, ValueError) as exc:
        raise DataFileError(f"{path}: cannot read obs/var ({exc}); the file may be truncated, re-export it") from None
    n = len(obs)
    skeleton = ad.AnnData(X=sp.csr_matrix((n, len(var)), dtype=np.float32), obs=obs, var=var)
    for key in layers:
        skeleton.layers[key] = skeleton.X
    if raw_var is not None:
        skeleton.raw = ad.AnnData(X=sp.csr_matrix((n, len(raw_var)), dtype=np.float32), obs=obs, var=raw_var)
    stored = read_stored_split(path, skeleton.obs_names)
    if stored is not None:
        skeleton.obs["split"] = stored
        skeleton.uns["split_file"] = str(split_file(path))
    return skeleton
