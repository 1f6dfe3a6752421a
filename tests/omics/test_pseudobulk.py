"""Pseudobulk: counts summed per donor, sample-level obs carried, cell types filtered, non-counts refused."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from omics.errors import ContractError
from omics.pseudobulk import PseudobulkError, pseudobulk

DONORS = [f"d{i}" for i in range(6)]


@pytest.fixture
def cells() -> ad.AnnData:
    """6 donors x 28-33 cells x 12 genes of sparse counts, cells of two types interleaved across donors."""
    rng = np.random.default_rng(3)
    sizes = [30, 28, 33, 31, 29, 30]
    donor = np.concatenate([[d] * n for d, n in zip(DONORS, sizes, strict=True)])
    order = rng.permutation(donor.size)  # donors interleaved: first appearance is not sorted order
    donor = donor[order]
    counts = rng.poisson(0.7, size=(donor.size, 12)).astype(np.float32)
    per_donor = {d: i for i, d in enumerate(DONORS)}
    obs = pd.DataFrame(
        {
            "donor": donor,
            "cell_type": rng.choice(["T", "B"], size=donor.size),
            "response": [float(per_donor[d] % 2) for d in donor],
            "age": [50.0 + per_donor[d] for d in donor],
            "sex": pd.Categorical(["F" if per_donor[d] < 3 else "M" for d in donor], categories=["F", "M"]),
            "n_genes": (counts > 0).sum(axis=1),
        },
        index=[f"c{i}" for i in range(donor.size)],
    )
    var = pd.DataFrame({"gene_symbols": [f"G{i}" for i in range(12)]}, index=[f"GENE{i}" for i in range(12)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def expected_sums(adata: ad.AnnData, keep=None) -> pd.DataFrame:
    dense = pd.DataFrame(adata.X.toarray().astype(np.float64), index=adata.obs["donor"].to_numpy())
    if keep is not None:
        dense = dense[keep]
    return dense.groupby(level=0, sort=False).sum()


def test_sums_are_exact_and_rows_follow_first_appearance(cells):
    bulk = pseudobulk(cells, sample_column="donor")
    truth = expected_sums(cells)
    assert list(bulk.obs_names) == list(pd.unique(cells.obs["donor"])) == list(truth.index)
    assert bulk.X.dtype == np.float64 and isinstance(bulk.X, np.ndarray)
    np.testing.assert_array_equal(bulk.X, truth.to_numpy())
    assert bulk.var.equals(cells.var)
    assert bulk.obs["n_cells"].tolist() == cells.obs["donor"].value_counts()[bulk.obs_names].tolist()
    assert bulk.obs["n_cells"].sum() == cells.n_obs


@pytest.mark.parametrize("block_elements", [2**22, 7])  # 7: many blocks, boundaries inside rows
def test_sparse_and_dense_give_the_same_result(cells, monkeypatch, block_elements):
    monkeypatch.setattr("omics.pseudobulk._BLOCK_ELEMENTS", block_elements)
    dense = cells.copy()
    dense.X = cells.X.toarray()
    for kwargs in ({}, {"cell_type_column": "cell_type", "cell_type": "B"}):
        a, b = pseudobulk(cells, sample_column="donor", **kwargs), pseudobulk(dense, sample_column="donor", **kwargs)
        np.testing.assert_array_equal(a.X, b.X)
        pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.X, expected_sums(cells, keep=(cells.obs["cell_type"] == "B").to_numpy()))


def test_integer_dense_and_csc_counts(cells):
    as_int = cells.copy()
    as_int.X = cells.X.toarray().astype(np.int32)
    as_csc = cells.copy()
    as_csc.X = sp.csc_matrix(cells.X)
    truth = expected_sums(cells).to_numpy()
    np.testing.assert_array_equal(pseudobulk(as_int, sample_column="donor").X, truth)
    np.testing.assert_array_equal(pseudobulk(as_csc, sample_column="donor").X, truth)


def test_constant_columns_are_carried_and_varying_ones_dropped(cells):
    bulk = pseudobulk(cells, sample_column="donor")
    assert list(bulk.obs.columns) == ["donor", "response", "age", "sex", "n_cells"]
    by_donor = {d: i for i, d in enumerate(DONORS)}
    assert bulk.obs["age"].tolist() == [50.0 + by_donor[d] for d in bulk.obs_names]
    assert bulk.obs["response"].tolist() == [float(by_donor[d] % 2) for d in bulk.obs_names]
    assert isinstance(bulk.obs["sex"].dtype, pd.CategoricalDtype)
    assert bulk.uns["pseudobulk"]["dropped_columns"] == ["cell_type", "n_genes"]
    assert bulk.uns["pseudobulk"]["cells"] == cells.n_obs


def test_a_required_column_that_varies_within_a_sample_is_refused(cells):
    cells.obs.loc[cells.obs_names[cells.obs["donor"] == "d4"][:2], "age"] = [99.0, 98.0]
    with pytest.raises(
        PseudobulkError,
        match=r"m\.h5ad: obs\.age: 'age' varies within sample 'd4' \(values .*99\.0.*\).*fix: make 'age' a "
        r"sample-level column .*or drop it from the tasks and covariates",
    ):
        pseudobulk(cells, sample_column="donor", required_columns=["response", "age"], path="m.h5ad")
    assert "age" not in pseudobulk(cells, sample_column="donor", required_columns=["response"]).obs.columns


def test_cell_type_filter(cells):
    bulk = pseudobulk(cells, sample_column="donor", cell_type_column="cell_type", cell_type="T")
    is_t = (cells.obs["cell_type"] == "T").to_numpy()
    truth = expected_sums(cells, keep=is_t)
    np.testing.assert_array_equal(bulk.X, truth.loc[bulk.obs_names].to_numpy())
    assert bulk.obs["n_cells"].sum() == is_t.sum()
    assert "cell_type" in bulk.obs.columns and set(bulk.obs["cell_type"]) == {"T"}
    assert bulk.uns["pseudobulk"]["cell_type"] == "T"


def test_cell_type_errors(cells):
    with pytest.raises(
        PseudobulkError, match=r"obs\.cell_type: no cell has cell type 'NK'; the column holds \[(T, B|B, T)\]"
    ):
        pseudobulk(cells, sample_column="donor", cell_type_column="cell_type", cell_type="NK")
    with pytest.raises(
        PseudobulkError, match=r"obs\.celltype: pseudobulk needs column 'celltype' in obs; found: \[donor"
    ):
        pseudobulk(cells, sample_column="donor", cell_type_column="celltype", cell_type="T")
    with pytest.raises(PseudobulkError, match=r"cell type is given but no column"):
        pseudobulk(cells, sample_column="donor", cell_type="T")


def test_missing_sample_column_and_cells_without_a_sample(cells):
    with pytest.raises(ContractError, match=r"obs\.patient: pseudobulk needs column 'patient'"):
        pseudobulk(cells, sample_column="patient")
    cells.obs["donor"] = cells.obs["donor"].astype(object)
    cells.obs.iloc[[4, 9], cells.obs.columns.get_loc("donor")] = None
    with pytest.raises(PseudobulkError, match=r"obs\.donor: 2 cells have no sample \(first: 'c4'\)"):
        pseudobulk(cells, sample_column="donor")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda X: X - 0.5, r"X: X is not counts: \d+ negative, \d+ non-integer and 0 NaN"),
        (lambda X: np.log1p(X), r"X is not counts: 0 negative, \d+ non-integer"),
        (lambda X: np.where(X > 2, np.nan, X), r"X is not counts: 0 negative, 0 non-integer and \d+ NaN or infinite"),
    ],
)
@pytest.mark.parametrize("sparse", [True, False])
def test_non_counts_are_refused_with_the_layer_fix(cells, change, match, sparse):
    values = change(cells.X.toarray())
    cells.X = sp.csr_matrix(values) if sparse else values
    with pytest.raises(
        PseudobulkError, match=match + r".*fix: pseudobulk sums raw counts.*'layer: counts' or 'layer: raw'"
    ):
        pseudobulk(cells, sample_column="donor", path="m.h5ad")


def test_the_cells_matrix_is_never_densified(cells, monkeypatch):
    """Only the samples x genes result becomes dense."""
    densified = []
    for kind in (sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.csc_array):
        original = kind.toarray

        def toarray(self, *args, _original=original, **kwargs):
            densified.append(self.shape)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "toarray", toarray)
        monkeypatch.setattr(kind, "todense", lambda self, *a, **k: pytest.fail("todense called"))
    bulk = pseudobulk(cells, sample_column="donor")
    assert bulk.n_obs == 6
    assert all(rows == 6 for rows, _ in densified), densified
