"""A stratified, seeded train/validation/test split, stored in ``obs['split']``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def stratification_key(obs: pd.DataFrame, tasks: Sequence[Any]) -> pd.Series:
    """Strata: each binary task's label and each survival task's event, missing labels as their own stratum."""
    key = pd.Series("", index=obs.index)
    for task in tasks:
        column = task.column if task.type == "binary" else task.event if task.type == "survival" else None
        if column is not None and column in obs.columns:
            key = key + "|" + pd.to_numeric(obs[column], errors="coerce").fillna(-1).astype(int).astype(str)
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
