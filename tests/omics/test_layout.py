"""AnnData conventions: layers and .raw, identifiers in a var column, Ensembl versions, symbols, text labels."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from omics.contract import ContractRules, check_member
from omics.errors import ContractError
from omics.labels import LabelError, binary_labels
from omics.layout import LayoutError, MemberLayout, apply_layout, read_symbols, with_symbols
from omics.normalize import normalize
from omics.prepare import member_arrays, prepare_member

ENSEMBL = [f"ENSG{i:011d}" for i in range(40)]


class Task:
    def __init__(self, **kw):
        self.__dict__.update(kw)


RESP = Task(name="resp", type="binary", column="response")


def rules(panel=ENSEMBL, **kw):
    return ContractRules(**{"panel": panel, "id_kind": "ensembl", "min_class_count": 5, **kw})


def errors(report):
    return [f for f in report.findings if f.level == "error"]


def versioned(adata: ad.AnnData) -> ad.AnnData:
    adata.var_names = [f"{e}.{i % 3 + 1}" for i, e in enumerate(ENSEMBL)]
    adata.var["gene_symbols"] = [f"GENE{i}" for i in range(40)]
    return adata


def test_ensembl_versions_are_stripped_and_counted(small_adata):
    report = check_member(versioned(small_adata), tasks=[RESP], rules=rules())
    assert report.fit, report.findings
    assert report.coverage == 1.0
    assert report.layout["versions_stripped"] == 40
    assert report.to_dict()["layout"]["versions_stripped"] == 40
    assert any("40 Ensembl IDs carried a version suffix" in f.message for f in report.findings)


def test_stripping_that_makes_ids_collide_is_refused(small_adata):
    adata = versioned(small_adata)
    adata.var_names = [ENSEMBL[0] + ".1", ENSEMBL[0] + ".2", *adata.var_names[2:]]
    report = check_member(adata, tasks=[RESP], rules=rules(), path="m.h5ad")
    (error,) = errors(report)
    assert error.field == "var_names"
    assert "makes 1 identifiers collide" in error.message
    assert f"['{ENSEMBL[0]}.1', '{ENSEMBL[0]}.2'] -> '{ENSEMBL[0]}'" in error.message
    assert "keep one version of each gene" in error.fix
    with pytest.raises(ContractError, match="collide"):
        prepare_member(adata, tasks=[RESP], rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0)


def test_counts_from_a_layer_and_identifiers_from_a_var_column(small_adata):
    counts = small_adata.X.copy()
    small_adata.layers["counts"] = counts
    small_adata.X = np.log1p(counts)  # what a scanpy user keeps in X after normalizing
    small_adata.var["gene_ids"] = [f"{e}.7" for e in ENSEMBL]
    layout = MemberLayout(layer="counts", var_id_column="gene_ids", member="m1")
    report = check_member(small_adata, tasks=[RESP], rules=rules(), layout=layout)
    assert report.fit, report.findings
    assert report.layout == {
        "matrix": "layers['counts']",
        "identifiers": "var['gene_ids']",
        "versions_stripped": 40,
        "symbols": None,
    }
    prepared = prepare_member(
        small_adata, tasks=[RESP], rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0, layout=layout
    )
    assert list(prepared.var_names) == ENSEMBL
    expected = normalize(ad.AnnData(X=counts), copy=True).layers["log"]
    np.testing.assert_allclose(prepared.layers["log"], expected, rtol=1e-6)
    assert small_adata.X.max() < 10  # the caller's object is untouched


def test_counts_from_raw(small_adata):
    full = ad.AnnData(X=small_adata.X.copy(), obs=small_adata.obs, var=pd.DataFrame(index=ENSEMBL))
    full.raw = full
    reduced = full[:, :10].copy()  # a scanpy user's highly-variable subset; .raw keeps every gene
    panel_rules = rules()
    assert not check_member(reduced, tasks=[RESP], rules=panel_rules).fit  # 25% coverage from X
    report = check_member(reduced, tasks=[RESP], rules=panel_rules, layout=MemberLayout(layer="raw"))
    assert report.fit and report.coverage == 1.0 and report.layout["matrix"] == "raw.X"


@pytest.mark.parametrize(
    ("layout", "field", "message", "fix"),
    [
        (
            MemberLayout(layer="counts", member="m1"),
            "layer",
            "member 'm1' (m.h5ad): no layer 'counts'; the file holds layers [spliced]",
            "set 'layer' to one of those",
        ),
        (
            MemberLayout(layer="raw", member="m1"),
            "layer",
            "the file has no .raw; its layers are [spliced]",
            "name one of the layers",
        ),
        (
            MemberLayout(var_id_column="gene_ids", member="m1"),
            "var.gene_ids",
            "var_id_column 'gene_ids' is not a column of var; its columns are [feature_types]",
            "set var_id_column",
        ),
        (
            MemberLayout(symbol_column="symbol", member="m1"),
            "var.symbol",
            "symbol_column 'symbol' is not a column of var",
            "leave it out",
        ),
    ],
)
def test_missing_layer_or_column_names_member_file_and_what_exists(small_adata, layout, field, message, fix):
    small_adata.layers["spliced"] = small_adata.X.copy()
    small_adata.var["feature_types"] = "Gene Expression"
    report = check_member(
        small_adata,
        tasks=[RESP],
        rules=rules(panel=list(small_adata.var_names), id_kind="symbol"),
        layout=layout,
        path="m.h5ad",
    )
    (error,) = errors(report)
    assert (error.field, message in error.message, fix in error.fix) == (field, True, True), error
    with pytest.raises(LayoutError, match="m.h5ad"):
        apply_layout(small_adata, layout=layout, path="m.h5ad")


def test_gene_symbols_are_carried_to_the_prepared_data_and_read_without_the_matrix(small_adata, tmp_path):
    adata = versioned(small_adata)
    prepared = prepare_member(adata, tasks=[RESP], rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert prepared.var.loc[ENSEMBL[3], "gene_symbols"] == "GENE3"
    adata.write_h5ad(tmp_path / "m.h5ad")
    symbols = read_symbols(tmp_path / "m.h5ad")
    assert symbols[ENSEMBL[5]] == "GENE5" and len(symbols) == 40
    table = pd.DataFrame({"feature": [ENSEMBL[5], "ENSG99999999999"], "score": [2.0, 1.0]})
    shown = with_symbols(table, symbols)
    assert list(shown.columns) == ["feature", "symbol", "score"]
    assert list(shown["symbol"]) == ["GENE5", ""]


# -- binary labels: 0/1, or text through `positive:` ------------------------------------------------


def test_text_labels_without_positive_are_a_clear_error(small_adata):
    small_adata.obs["response"] = np.where(small_adata.obs["response"] == 1, "responder", "non-responder")
    report = check_member(small_adata, tasks=[RESP], rules=rules(panel=list(small_adata.var_names), id_kind="symbol"))
    (error,) = errors(report)
    assert error.field == "obs.response"
    assert "task 'resp': column 'response' holds text labels ['non-responder', 'responder']" in error.message
    assert (
        "add `positive: 'responder'` to task 'resp' in consortium.yaml if 'responder' is the class to predict"
        in error.fix
    )


def test_positive_maps_text_labels_to_one_and_zero(small_adata):
    truth = small_adata.obs["response"].to_numpy().copy()
    small_adata.obs["response"] = pd.Categorical(np.where(truth == 1, "CR", "PD"))
    small_adata.obs.loc[small_adata.obs_names[0], "response"] = np.nan
    truth[0] = np.nan
    task = Task(name="resp", type="binary", column="response", positive="CR")
    report = check_member(small_adata, tasks=[task], rules=rules(panel=list(small_adata.var_names), id_kind="symbol"))
    assert report.fit, report.findings
    assert report.tasks["resp"]["positive"] == "CR"
    prepared = prepare_member(
        small_adata,
        tasks=[task],
        rules=rules(panel=list(small_adata.var_names), id_kind="symbol"),
        val_fraction=0.2,
        test_fraction=0.2,
        seed=0,
    )
    np.testing.assert_array_equal(member_arrays(prepared, tasks=[task])["targets"]["resp"], truth)


def test_positive_that_no_sample_carries_is_an_error():
    task = Task(name="resp", type="binary", column="response", positive="CR ")
    with pytest.raises(LabelError, match=r"positive 'CR ' is not among the labels of column 'response' \['CR', 'PD'\]"):
        binary_labels(pd.Series(["CR", "PD"]), task)
    numeric = Task(name="resp", type="binary", column="response", positive=2)
    np.testing.assert_array_equal(binary_labels(pd.Series([1, 2, np.nan]), numeric), [0.0, 1.0, np.nan])


# -- normalization: numpy, the same numbers as scanpy, and no scanpy in a member process --------------


def test_normalize_matches_scanpy(small_adata):
    sc = pytest.importorskip("scanpy")
    ours = normalize(small_adata, copy=True)
    theirs = small_adata.copy()
    sc.pp.normalize_total(theirs, target_sum=1e4)
    sc.pp.log1p(theirs)
    np.testing.assert_allclose(ours.layers["log"], theirs.X, rtol=1e-5, atol=1e-6)
    sc.pp.scale(theirs, max_value=10.0)
    np.testing.assert_allclose(ours.X, theirs.X, rtol=1e-3, atol=2e-3)  # scanpy scales by the ddof=1 SD too


def test_loading_and_preparing_a_member_does_not_import_scanpy(small_adata, tmp_path):
    small_adata.write_h5ad(tmp_path / "m.h5ad")
    script = (
        "import sys\n"
        "from omics.contract import ContractRules\n"
        "from omics.io import read_member\n"
        "from omics.prepare import log_expression, member_arrays, prepare_member\n"
        "import omics.statistics\n"
        "class T:\n"
        "    name, type, column = 'resp', 'binary', 'response'\n"
        f"adata = read_member({str(tmp_path / 'm.h5ad')!r})\n"
        "rules = ContractRules(panel=list(adata.var_names), min_class_count=5)\n"
        "p = prepare_member(adata, tasks=[T()], rules=rules, val_fraction=0.2, test_fraction=0.2, seed=0)\n"
        "member_arrays(p, tasks=[T()]); log_expression(p)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scanpy'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
