"""Shared fixtures: small synthetic AnnData and a small synthetic consortium on disk."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from consortium.commands.synth import synthesize


@pytest.fixture
def small_adata() -> ad.AnnData:
    """80 samples x 40 gene-symbol features of counts, with a binary, a regression and a survival outcome."""
    rng = np.random.default_rng(7)
    n, p = 80, 40
    X = rng.poisson(20, size=(n, p)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "response": rng.integers(0, 2, n).astype(float),
            "level": rng.normal(size=n),
            "os_days": rng.uniform(5, 400, n),
            "os_event": rng.integers(0, 2, n).astype(float),
        },
        index=[f"s{i}" for i in range(n)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(p)]))


@pytest.fixture
def small_config_dict(tmp_path: Path, small_adata: ad.AnnData) -> dict:
    """A one-member consortium.yaml mapping over ``small_adata`` written to tmp_path."""
    small_adata.write_h5ad(tmp_path / "m.h5ad")
    return {
        "name": "tiny",
        "operator": {"org": "op"},
        "panel": {"features": [f"GENE{i}" for i in range(40)]},
        "data": {"min_class_count": 5, "min_events": 5, "min_labeled": 10},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "m.h5ad",
                "tasks": [
                    {"name": "resp", "type": "binary", "column": "response"},
                    {"name": "lvl", "type": "regression", "column": "level"},
                    {"name": "os", "type": "survival", "time": "os_days", "event": "os_event"},
                ],
            }
        ],
    }


@pytest.fixture(scope="session")
def tiny_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-member synthetic consortium (150 and 200 samples x 200 features); returns its consortium.yaml."""
    out = tmp_path_factory.mktemp("tiny_consortium")
    return synthesize(out, sizes=[150, 200], n_features=200, seed=3, rounds=2)
