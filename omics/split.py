"""A stratified, seeded train/validation/test split, stored in ``obs['split']``.

``consortium data split`` keeps it beside the member's file (``<name>.split.csv``: sample, split) rather
than rewriting the file; :func:`omics.io.read_member` reads it back into ``obs['split']``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from omics.errors import DataFileError
from omics.labels import LabelError, binary_labels

log = logging.getLogger(__name__)


def stratification_key(obs: pd.DataFrame, tasks: Sequence[Any]) -> pd.Series:
    """Strata: each binary task's label and each survival task's event, missing labels as their own stratum."""
    key = pd.Series("", index=obs.index)
    for task in tasks:
        column = task.column if task.type == "binary" else task.event if task.type == "survival" else None
        if column is None or column not in obs.columns:
            continue
        try:
            labels = binary_labels(obs[column], task) if task.type == "binary" else None
        except LabelError:
            labels = None  # unreadable labels (the contract check names them): no stratum from this task
        if labels is None:
            labels = pd.to_numeric(obs[column], errors="coerce")
        key = key + "|" + labels.fillna(-1).astype(int).astype(str)
    return key


def assign_split(
    adata: ad.AnnData,
    *,
    tasks: Sequence[Any],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    copy: bool = False,
) -> ad.AnnData | None:
    """Write a stratified split into ``obs['split']`` and its parameters into ``uns['split']``.

    The same data, tasks, fractions and seed always give the same split.
    """
    adata = adata.copy() if copy else adata
    rng = np.random.default_rng(seed)
    key = stratification_key(adata.obs, tasks).to_numpy()
    split = np.full(adata.n_obs, "train", dtype=object)
    for stratum in sorted(set(key)):
        rows = rng.permutation(np.flatnonzero(key == stratum))
        n_test = int(round(test_fraction * rows.size))
        n_val = int(round(val_fraction * rows.size))
        split[rows[:n_test]] = "test"
        split[rows[n_test : n_test + n_val]] = "val"
    adata.obs["split"] = pd.Categorical(split, categories=["train", "val", "test"])
    adata.uns["split"] = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "stratified_by": [t.name for t in tasks if t.type in ("binary", "survival")],
    }
    log.info("split %s", dict(adata.obs["split"].value_counts()))
    return adata if copy else None


def assign_folds(
    adata: ad.AnnData,
    *,
    tasks: Sequence[Any],
    folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
    copy: bool = False,
) -> ad.AnnData | None:
    """Cross-validation: stratified ``folds``-way partition; fold ``fold`` is the test split.

    Every sample is a test sample in exactly one fold. Of the other samples, a stratified
    ``val_fraction`` is the validation split (for early stopping), the rest the training split. The
    partition depends only on the data, the tasks, ``folds`` and ``seed``, so the ``folds`` runs of one
    cross-validation see disjoint test splits. Writes ``obs['fold']``, ``obs['split']`` and ``uns['split']``.
    """
    if folds < 2:
        raise ValueError(f"folds={folds}; cross-validation needs at least 2 folds")
    if not 0 <= fold < folds:
        raise ValueError(f"fold={fold}; use a fold index from 0 to {folds - 1}")
    adata = adata.copy() if copy else adata
    rng = np.random.default_rng(seed)
    key = stratification_key(adata.obs, tasks).to_numpy()
    assigned = np.zeros(adata.n_obs, dtype=int)
    offset = 0
    for stratum in sorted(set(key)):
        rows = rng.permutation(np.flatnonzero(key == stratum))
        # deal the stratum's rows round-robin, continuing where the previous stratum stopped
        assigned[rows] = (np.arange(rows.size) + offset) % folds
        offset += rows.size
    split = np.where(assigned == fold, "test", "train").astype(object)
    val_rng = np.random.default_rng([seed, fold])
    for stratum in sorted(set(key)):
        rest = val_rng.permutation(np.flatnonzero((key == stratum) & (assigned != fold)))
        split[rest[: int(round(val_fraction * rest.size))]] = "val"
    adata.obs["fold"] = assigned
    adata.obs["split"] = pd.Categorical(split, categories=["train", "val", "test"])
    adata.uns["split"] = {
        "seed": seed,
        "folds": folds,
        "fold": fold,
        "val_fraction": val_fraction,
        "stratified_by": [t.name for t in tasks if t.type in ("binary", "survival")],
    }
    log.info("fold %d of %d: %s", fold, folds, dict(adata.obs["split"].value_counts()))
    return adata if copy else None


SPLITS = ("train", "val", "test")


def split_file(data: str | Path) -> Path:
    """Where a member's stored split lies: ``m.h5ad`` -> ``m.split.csv`` beside it."""
    data = Path(data)
    return data.with_name(f"{data.stem}.split.csv")


def write_split_file(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``obs['split']`` as ``sample,split`` rows atomically (parameters in a leading comment)."""
    path = Path(path)
    params = " ".join(f"{k}={v}" for k, v in adata.uns.get("split", {}).items())
    table = pd.DataFrame({"sample": adata.obs_names.astype(str), "split": adata.obs["split"].astype(str).to_numpy()})
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(f"# consortium data split: {params}\n")
            table.to_csv(handle, index=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_split_file(path: str | Path, obs_names: pd.Index) -> pd.Categorical:
    """The split stored in ``path`` for the samples ``obs_names``, in their order.

    Raises
    ------
    DataFileError
        The file is unreadable, lacks samples of the data, or holds other values than train/val/test.
    """
    path = Path(path)
    fix = f"re-create it with 'consortium data split --force', or delete {path.name}"
    try:
        table = pd.read_csv(path, comment="#", dtype=str)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: unreadable stored split ({exc}); {fix}") from None
    if list(table.columns) != ["sample", "split"]:
        raise DataFileError(f"{path}: expected the columns sample,split, found {list(table.columns)}; {fix}")
    stored = table.set_index("sample")["split"]
    missing = pd.Index(obs_names.astype(str)).difference(stored.index)
    if len(missing) or stored.index.duplicated().any():
        problem = (
            f"{len(missing)} samples of the data are not in it, e.g. {list(missing[:3])}"
            if len(missing)
            else ("it repeats samples")
        )
        raise DataFileError(f"{path}: {problem}; {fix}")
    values = stored.reindex(obs_names.astype(str))
    other = sorted(set(values.dropna()) - set(SPLITS))
    if other or values.isna().any():
        raise DataFileError(f"{path}: holds values {other[:5] or ['(empty)']}; use only train, val and test: {fix}")
    return pd.Categorical(values.to_numpy(), categories=list(SPLITS))
