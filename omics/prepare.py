"""From a member's raw AnnData to model-ready arrays: read its layout, check, split, normalize, harmonize."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from omics.clinical import ClinicalBlock, clinical_scaling, encode_clinical, filled
from omics.contract import ContractRules, check_view
from omics.errors import ContractError
from omics.harmonize import harmonize_to_panel
from omics.labels import binary_labels
from omics.layout import MemberLayout, apply_layout
from omics.normalize import normalize, scale_features
from omics.pseudobulk import pseudobulk
from omics.split import assign_folds, assign_split

log = logging.getLogger(__name__)


def prepare_member(
    adata: ad.AnnData,
    *,
    tasks: Sequence[Any],
    rules: ContractRules,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int | None = None,
    layout: MemberLayout = MemberLayout(),
    path: str = "",
) -> ad.AnnData:
    """Read ``adata`` through ``layout``, check the contract, then split (a stored split is kept),
    normalize and harmonize to the panel.

    With ``folds`` and ``fold``, the split is fold ``fold`` of a stratified cross-validation
    (:func:`omics.split.assign_folds`) instead, whatever split the file stores.

    Raises
    ------
    ContractError
        The layout does not fit the file, or the data is not fit to join; the message lists every
        error with its fix.
    """
    work = apply_layout(adata, layout=layout, path=path)  # a new object: the caller's adata is not changed
    del adata  # not held here past its normalization (a caller that keeps the file as read still holds it)
    train = checked_split(
        work,
        tasks=tasks,
        rules=rules,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        folds=folds,
        fold=fold,
        path=path,
    )
    if not rules.panel:  # a clinical-only consortium: the file's features are no input
        work = work[:, []].copy()
    normalize(work, values=rules.values, fit_rows=train)
    prepared = harmonize_to_panel(work, panel=rules.panel, min_coverage=rules.min_coverage)
    if rules.clinical:
        add_clinical(prepared, clinical=rules.clinical, fit_rows=train, path=path)
    return prepared


def checked_split(
    work: ad.AnnData,
    *,
    tasks: Sequence[Any],
    rules: ContractRules,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int | None = None,
    path: str = "",
    stored=None,
) -> np.ndarray:
    """Check the contract on the layout's view ``work`` (raise :class:`ContractError` listing every error
    with its fix), then split it in place (``obs['split']``; a stored split is kept, ``folds`` makes fold
    ``fold`` of a cross-validation); returns the training rows, which alone fit the scaling statistics.
    ``stored``: the matrix whose values are checked when ``work.X`` does not hold them
    (:func:`omics.contract.check_view`)."""
    report = check_view(work, tasks=tasks, rules=rules, path=path, stored=stored)
    if not report.fit:
        errors = [f"  {f.field}: {f.message} (fix: {f.fix})" for f in report.findings if f.level == "error"]
        raise ContractError(f"{path or 'member data'} is not fit to join:\n" + "\n".join(errors))
    if folds:
        assign_folds(work, tasks=tasks, folds=folds, fold=fold or 0, val_fraction=val_fraction, seed=seed)
    elif "split" not in work.obs.columns:
        assign_split(work, tasks=tasks, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    # scaling statistics come from the training split only: validation and test samples never shape them
    return (work.obs["split"].astype(str) == "train").to_numpy()


def add_clinical(adata: ad.AnnData, *, clinical: Sequence[Any], fit_rows: np.ndarray, path: str = "") -> None:
    """Encode ``panel.clinical`` (:func:`omics.clinical.encode_clinical`) into ``obsm['clinical']`` (missing
    numeric values NaN) and its inputs' names, kinds and training-split ``mean``/``std`` into
    ``uns['clinical']``; :func:`member_arrays` and :func:`panel_scaling` put them after the omics features."""
    block = encode_clinical(adata.obs, clinical, path=path)
    mean, std = clinical_scaling(block, fit_rows=fit_rows)
    adata.obsm["clinical"] = block.values
    adata.uns["clinical"] = {
        "names": block.names,
        "kinds": block.kinds,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "missing": {n: int(np.isnan(block.values[:, j]).sum()) for j, n in enumerate(block.names) if block.numeric[j]},
    }
    log.info("clinical inputs: %s (fitted on %d training samples)", block.names, int(np.sum(fit_rows)))


def clinical_inputs(adata: ad.AnnData) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A prepared AnnData's clinical inputs, missing values filled with their training mean (unscaled), and
    ``uns['clinical']``; ``None`` without ``panel.clinical``."""
    if "clinical" not in adata.uns:
        return None
    info = adata.uns["clinical"]
    block = ClinicalBlock(
        list(info["names"]), list(info["kinds"]), np.asarray(adata.obsm["clinical"], dtype=np.float64)
    )
    return filled(block, mean=np.asarray(info["mean"], dtype=np.float64)), info


def task_targets(obs: pd.DataFrame, task: Any) -> np.ndarray:
    """A task's labels: ``(n,)`` floats, or ``(n, 2)`` ``[time, event]`` for survival; NaN = missing."""
    if task.type == "survival":
        time = pd.to_numeric(obs[task.time], errors="coerce").to_numpy(dtype=np.float64)
        event = pd.to_numeric(obs[task.event], errors="coerce").to_numpy(dtype=np.float64)
        either_missing = np.isnan(time) | np.isnan(event)
        time[either_missing] = np.nan
        event[either_missing] = np.nan
        return np.stack([time, event], axis=1)
    if task.type == "binary":
        return binary_labels(obs[task.column], task).to_numpy(dtype=np.float64)
    return pd.to_numeric(obs[task.column], errors="coerce").to_numpy(dtype=np.float64)


def member_arrays(adata: ad.AnnData, *, tasks: Sequence[Any], scaled: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``models.data.MemberData`` for a prepared AnnData; a sparse member's ``X`` is
    its CSR log values (``uns['normalization']['scaled']`` False), for ``models.data.ScaledRows``.

    ``scaled=False``: a dense member's ``X`` is its log values too (:func:`log_expression`, the clinical
    inputs after them unscaled), to be scaled as rows are read (``models.data.ScaledRows`` with
    :func:`panel_scaling`); without clinical inputs it is the very array :func:`log_expression` gives."""
    sparse = sp.issparse(adata.X)
    X = adata.X if sparse else (np.asarray(adata.X, dtype=np.float32) if scaled else log_expression(adata))
    names = [str(x) for x in adata.var_names]
    clinical = clinical_inputs(adata)
    if clinical is not None:  # after the omics features; beside log values: unscaled, as they are
        values, info = clinical
        names += list(info["names"])
        if sparse:
            X = sp.hstack([X, sp.csr_matrix(values.astype(np.float32))], format="csr", dtype=np.float32)
        elif scaled:
            max_value = float(adata.uns["normalization"]["max_value"])
            columns = scale_features(values, mean=info["mean"], std=info["std"], max_value=max_value)
            X = np.hstack([X, columns]).astype(np.float32, copy=False)
        else:
            X = np.hstack([X, values.astype(np.float32)])
    return {
        # sparse (or scaled=False): the log values, which the caller scales per block of rows with panel_scaling
        "X": X,
        "targets": {task.name: task_targets(adata.obs, task) for task in tasks},
        "split": adata.obs["split"].astype(str).to_numpy(),
        "feature_names": names,
    }


def panel_scaling(adata: ad.AnnData) -> dict[str, Any]:
    """The fixed preprocessing of a prepared AnnData, in panel order, for the member to keep and score
    with: the normalization's parameters, which features it measures, and each measured feature's
    training-split mean and SD on the log scale (an unmeasured feature: 0 and 1, never used)."""
    measured = adata.var["measured"].to_numpy(dtype=bool)
    mean = np.where(measured, adata.var["norm_mean"].to_numpy(dtype=np.float64), 0.0)
    std = np.where(measured, adata.var["norm_std"].to_numpy(dtype=np.float64), 1.0)
    info = adata.uns["normalization"]
    features = [str(x) for x in adata.var_names]
    if "clinical" in adata.uns:  # the clinical inputs after the omics features, each measured
        clinical = adata.uns["clinical"]
        features += list(clinical["names"])
        measured = np.concatenate([measured, np.ones(len(clinical["names"]), dtype=bool)])
        mean = np.concatenate([mean, np.asarray(clinical["mean"], dtype=np.float64)])
        std = np.concatenate([std, np.asarray(clinical["std"], dtype=np.float64)])
    return {
        "features": features,
        "measured": measured.tolist(),
        "mean": mean.astype(np.float32).tolist(),
        "std": std.astype(np.float32).tolist(),
        "values": str(info["values"]),
        "target_sum": float(info["target_sum"]),
        "max_value": float(info["max_value"]),
        "fitted_on": str(info["fitted_on"]),
    }


def log_expression(adata: ad.AnnData) -> np.ndarray | sp.csr_matrix:
    """The log-scale expression of a prepared AnnData before per-feature scaling (``layers['log']``,
    unclipped), for association statistics; features the member did not measure are 0 (and masked).

    Float32 (the precision the values were computed in; the statistics sum them in float64); a sparse
    member's stays a CSR matrix (harmonization already holds no value in an unmeasured column)."""
    layer = adata.layers["log"]
    if sp.issparse(layer):
        return layer
    values = np.asarray(layer, dtype=np.float32)
    unmeasured = ~adata.var["measured"].to_numpy(dtype=bool)
    if values[:, unmeasured].any():  # harmonized data holds zeros there already: no copy then
        values = values.copy()
        values[:, unmeasured] = 0.0
    return values


def pseudobulk_member(
    adata: ad.AnnData,
    *,
    sample_column: str,
    panel: Sequence[str],
    min_coverage: float = 0.0,
    cell_type_column: str | None = None,
    cell_type: str | None = None,
    required_columns: Sequence[str] = (),
    layout: MemberLayout = MemberLayout(),
    path: str = "",
) -> ad.AnnData:
    """A single-cell member's samples for the statistics: counts summed per sample (and cell type), then
    library size + ``log1p`` and the panel, so the sample, not the cell, is the unit of every test.

    ``required_columns`` (the endpoints' and covariates' columns) must be constant within each sample.
    """
    work = apply_layout(adata, layout=layout, path=path)
    bulk = pseudobulk(
        work,
        sample_column=sample_column,
        cell_type_column=cell_type_column,
        cell_type=cell_type,
        required_columns=required_columns,
        path=path,
    )
    normalize(bulk, values="counts")
    return harmonize_to_panel(bulk, panel=panel, min_coverage=min_coverage)
