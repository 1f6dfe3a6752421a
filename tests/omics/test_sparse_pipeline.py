"""A member's CSR matrix stays sparse through normalization, harmonization and the statistics' site pieces,
and gives the dense member's results: the same log values and scaling, the same pieces to 1e-9."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import omics.linear_model
import omics.normalize
import omics.statistics
from omics.contract import ContractRules, check_view
from omics.design import DesignSpec
from omics.linear_model import site_linear_statistics
from omics.normalize import column_mean_std, log_values, normalize
from omics.prepare import log_expression, prepare_member
from omics.statistics import EndpointDesign, detection_pieces, site_statistics


class Task:
    def __init__(self, **kw):
        self.__dict__.update(kw)


TASKS = [Task(name="resp", type="binary", column="response"), Task(name="lvl", type="regression", column="level")]
FEATURES = [f"GENE{i}" for i in range(60)]
PANEL = FEATURES[5:] + [f"EXTRA{i}" for i in range(4)]  # 5 features outside the panel, 4 unmeasured


@pytest.fixture(params=["one block", "blocks of rows"])
def blocks(request, monkeypatch) -> str:
    """The sparse pieces read a CSR matrix in blocks of nonzeros: all of it at once, or a few rows at a time."""
    if request.param == "blocks of rows":
        monkeypatch.setattr(omics.linear_model, "_SPARSE_BLOCK_VALUES", 97)
        monkeypatch.setattr(omics.statistics, "_NONZERO_BLOCK", 101)
    return request.param


@pytest.fixture
def counts() -> tuple[np.ndarray, pd.DataFrame]:
    """150 samples x 60 features of counts, about 70% zeros, one empty sample and one all-zero feature."""
    rng = np.random.default_rng(11)
    n, p = 150, len(FEATURES)
    X = rng.poisson(4, size=(n, p)).astype(np.float32)
    X[rng.random((n, p)) < 0.7] = 0.0
    X[3] = 0.0
    X[:, 17] = 0.0
    obs = pd.DataFrame(
        {"response": rng.integers(0, 2, n).astype(float), "level": rng.normal(size=n), "age": rng.normal(60, 9, n)},
        index=[f"s{i}" for i in range(n)],
    )
    return X, obs


def _member(X, obs) -> ad.AnnData:
    return ad.AnnData(X=X, obs=obs.copy(), var=pd.DataFrame(index=FEATURES))


def _prepare(adata: ad.AnnData) -> ad.AnnData:
    rules = ContractRules(panel=PANEL, min_class_count=5, min_events=5, min_labeled=10)
    return prepare_member(adata, tasks=TASKS, rules=rules, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_log_values_of_a_csr_matrix_are_the_dense_values_and_stay_sparse(counts, monkeypatch):
    monkeypatch.setattr(omics.normalize, "_NONZEROS_PER_BLOCK", 100)  # several blocks of rows
    X, _ = counts
    dense = log_values(X, values="counts")
    sparse = log_values(sp.csr_matrix(X), values="counts")
    assert sp.isspmatrix_csr(sparse) and sparse.nnz == np.count_nonzero(X)
    np.testing.assert_array_equal(sparse.toarray(), dense)
    totals = X.sum(axis=1) * 2.0 + 1.0  # a library size over more features than the file's panel
    np.testing.assert_array_equal(
        log_values(sp.csr_matrix(X), values="counts", library_size=totals).toarray(),
        log_values(X, values="counts", library_size=totals),
    )


def test_column_mean_and_sd_from_the_nonzeros_equal_numpy(counts):
    X, _ = counts
    rows = np.arange(X.shape[0]) % 3 != 0
    mean, std = column_mean_std(sp.csr_matrix(X), rows, block=16)  # several blocks of rows
    np.testing.assert_allclose(mean, X[rows].astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, X[rows].astype(np.float64).std(axis=0, ddof=1), rtol=1e-12, atol=1e-12)


def test_normalize_keeps_a_csr_matrix_sparse_and_unscaled(counts):
    X, obs = counts
    adata = _member(sp.csr_matrix(X), obs)
    normalize(adata, values="counts")
    assert sp.isspmatrix_csr(adata.X) and adata.X.nnz == np.count_nonzero(X)
    assert adata.layers["log"] is adata.X  # one matrix, scaled per block of rows later
    assert adata.uns["normalization"]["scaled"] is False
    dense = _member(X, obs)
    normalize(dense, values="counts")
    assert dense.uns["normalization"]["scaled"] is True
    np.testing.assert_array_equal(adata.var["norm_mean"], dense.var["norm_mean"])
    np.testing.assert_array_equal(adata.var["norm_std"], dense.var["norm_std"])


def test_a_sparse_member_is_prepared_as_the_dense_one(counts):
    X, obs = counts
    dense, sparse = _prepare(_member(X, obs)), _prepare(_member(sp.csr_matrix(X), obs))
    assert sp.isspmatrix_csr(sparse.X) and sparse.X.shape == (X.shape[0], len(PANEL))
    assert list(sparse.var_names) == PANEL and sparse.var["measured"].sum() == len(PANEL) - 4
    np.testing.assert_array_equal(sparse.obs["split"], dense.obs["split"])
    for column in ("norm_mean", "norm_std"):
        np.testing.assert_array_equal(sparse.var[column].fillna(0), dense.var[column].fillna(0))
    values = log_expression(sparse)
    assert sp.issparse(values) and values.dtype == np.float32
    np.testing.assert_array_equal(values.toarray(), log_expression(dense))


def test_the_contract_check_reads_a_csr_matrix_without_making_it_dense(counts, monkeypatch):
    X, obs = counts
    adata = _member(sp.csr_matrix(X), obs)
    monkeypatch.setattr(sp.csr_matrix, "toarray", lambda *a, **k: pytest.fail("the check made X dense"))
    report = check_view(
        adata, tasks=TASKS, rules=ContractRules(panel=PANEL, min_class_count=5, min_events=5, min_labeled=10)
    )
    assert report.fit


def test_linear_pieces_from_the_sparse_structure_equal_the_dense_pieces(counts, blocks):
    X, obs = counts
    Y = log_values(X, values="counts").astype(np.float64)
    design = np.column_stack([obs["response"], obs["age"]])
    measured = np.ones(Y.shape[1], dtype=bool)
    measured[[2, 9]] = False
    dense = site_linear_statistics(Y, design, measured=measured, weight=0.7)
    sparse = site_linear_statistics(sp.csr_matrix(Y), design, measured=measured, weight=0.7)
    for key, value in dense.items():
        np.testing.assert_allclose(sparse[key], value, rtol=1e-9, atol=1e-9, err_msg=key)
    assert dense["yty"][5] > 1.0  # real values, not zeros on both sides


def test_site_statistics_and_detection_counts_are_the_same_on_sparse_input(counts, blocks):
    X, obs = counts
    Y = log_values(X, values="counts")
    measured = np.ones(Y.shape[1], dtype=bool)
    design = EndpointDesign(spec=DesignSpec("~ endpoint + age", numeric=("age",)), detection=True)
    target = obs["response"].to_numpy().copy()
    target[:4] = np.nan
    for kind, labels in (("binary", target), ("regression", obs["level"].to_numpy())):
        dense = site_statistics(Y, labels, obs, kind=kind, design=design, measured=measured)
        sparse = site_statistics(sp.csr_matrix(Y), labels, obs, kind=kind, design=design, measured=measured)
        assert dense.keys() == sparse.keys() and ("detected" in dense) == (kind == "binary")
        for key, value in dense.items():
            np.testing.assert_allclose(sparse[key], value, rtol=1e-9, atol=1e-9, err_msg=f"{kind} {key}")
    detected = detection_pieces(sp.csr_matrix(Y), obs["response"].to_numpy(), measured=measured)["detected"]
    np.testing.assert_array_equal(detected, (Y > 0).sum(axis=0))
