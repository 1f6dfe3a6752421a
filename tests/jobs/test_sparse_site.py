"""A member whose file holds a CSR matrix sends what the same member with a dense matrix sends: the same
statistics and pooled-scaling pieces to 1e-9, the same model and attribution to float32 arithmetic; and its
matrix stays sparse in the site (the model's rows are scaled per minibatch)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from nvflare.app_common.abstract.fl_model import FLModel

from jobs.recipe import server_model
from jobs.site import MemberSite
from jobs.site_outputs import SiteOutputs
from models.data import ScaledRows
from models.network import SharedModel
from schema.config import load_config


def _member(folder: Path, *, sparse: bool) -> Path:
    """120 samples x 50 features of counts, 70% zeros, a binary and a regression endpoint."""
    rng = np.random.default_rng(4)
    n, p = 120, 50
    counts = rng.poisson(5, size=(n, p)).astype(np.float32)
    counts[rng.random((n, p)) < 0.7] = 0.0
    counts[:, 0] += rng.poisson(20, n) * (np.arange(n) % 2)  # a feature that tells the classes apart
    obs = pd.DataFrame(
        {"response": (np.arange(n) % 2).astype(float), "level": rng.normal(size=n)}, index=[f"s{i}" for i in range(n)]
    )
    X = sp.csr_matrix(counts) if sparse else counts
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(p)])).write_h5ad(folder / "m.h5ad")
    raw = {
        "name": "sparse",
        "operator": {"org": "op"},
        "panel": {"features": [f"GENE{i}" for i in range(p + 3)]},
        "data": {"min_class_count": 5, "min_events": 5, "min_labeled": 10},
        "training": {"local_epochs": 2, "rounds": 1},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "m.h5ad",
                "tasks": [
                    {"name": "resp", "type": "binary", "column": "response"},
                    {"name": "lvl", "type": "regression", "column": "level"},
                ],
            }
        ],
    }
    (folder / "consortium.yaml").write_text(yaml.safe_dump(raw))
    return folder / "consortium.yaml"


def _last_round(tmp_path: Path, *, sparse: bool) -> tuple[MemberSite, dict[str, np.ndarray]]:
    folder = tmp_path / ("sparse" if sparse else "dense")
    folder.mkdir()
    config = load_config(_member(folder, sparse=sparse))
    site = MemberSite(config, "m1", outputs=SiteOutputs(folder / "site"))
    initial = {k: v.numpy() for k, v in SharedModel(**server_model(config)["args"]).state_dict().items()}
    sent = site.train_round(FLModel(params=initial, current_round=0, total_rounds=1))
    return site, {k: np.asarray(v, dtype=np.float64) for k, v in sent.params.items()}


def test_a_sparse_member_sends_what_the_dense_member_sends(tmp_path):
    dense_site, dense = _last_round(tmp_path, sparse=False)
    sparse_site, sparse = _last_round(tmp_path, sparse=True)
    assert isinstance(sparse_site.data.X, ScaledRows) and not dense_site.data.sparse
    assert sp.issparse(sparse_site.log_expression) and sparse_site.log_expression.dtype == np.float32
    assert dense.keys() == sparse.keys()
    statistics = [k for k in dense if k.startswith(("stats.", "scaling."))]
    assert any(k.startswith("stats.resp.") for k in statistics) and any(k.startswith("scaling.") for k in statistics)
    for key in statistics:
        np.testing.assert_allclose(sparse[key], dense[key], rtol=1e-9, atol=1e-9, err_msg=key)
    for key in set(dense) - set(statistics):  # the model and the attribution vectors
        np.testing.assert_allclose(sparse[key], dense[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert np.abs(dense["stats.resp.xty"]).max() > 0.01  # real pieces, not zeros on both sides
