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
