"""Counts or not: which matrix of a member's file holds counts, and the fix the contract gives."""

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from omics.contract import ContractRules, check_member
from omics.layout import MemberLayout
from omics.values import count_findings, counts_fix, holds_counts, matrices_with_counts


class Task:
    def __init__(self, **kw):
        self.__dict__.update(kw)


RESP = Task(name="resp", type="binary", column="response")


def test_counts_are_whole_non_negative_finite_and_not_all_zero():
    counts = np.array([[0, 3], [5, 0]], dtype=np.float32)
    assert holds_counts(counts) and holds_counts(counts.astype(np.int64)) and holds_counts(sp.csr_matrix(counts))
    assert not holds_counts(np.log1p(counts))
    assert not holds_counts(counts - 1)
    assert not holds_counts(np.zeros((2, 2)))
    assert not holds_counts(np.array([[1.0, np.nan]]))
    assert count_findings(sp.csr_matrix(counts)) == []


def test_every_other_matrix_holding_counts_is_named_as_the_layer_setting_spells_it(small_adata):
    counts = small_adata.X.copy()
    small_adata.layers["counts"] = sp.csr_matrix(counts)
    small_adata.layers["log"] = np.log1p(counts)
    small_adata.raw = small_adata.copy()
    small_adata.X = np.log1p(counts)
    assert matrices_with_counts(small_adata) == ["counts", "raw"]
    assert matrices_with_counts(small_adata, layout=MemberLayout(layer="raw")) == ["counts"]
    small_adata.X = counts
    assert matrices_with_counts(small_adata, layout=MemberLayout(layer="log")) == ["counts", "raw", "X"]


def test_a_layer_read_that_holds_log_values_points_back_at_x(small_adata):
    small_adata.layers["log"] = np.log1p(small_adata.X)
    rules = ContractRules(panel=list(small_adata.var_names), min_class_count=5)
    report = check_member(small_adata, tasks=[RESP], rules=rules, layout=MemberLayout(layer="log", member="m1"))
    (error,) = [f for f in report.findings if f.level == "error"]
    assert error.field == "layers['log']"
    assert error.fix == counts_fix(["X"], member="m1")
    assert error.fix.startswith("X of the file holds the raw counts: leave 'layer' out for member 'm1'")
    assert check_member(small_adata, tasks=[RESP], rules=rules).fit  # X itself: counts


def test_values_normalized_accepts_log_values_without_looking_for_counts(small_adata):
    small_adata.X = np.log1p(small_adata.X)
    rules = ContractRules(panel=list(small_adata.var_names), min_class_count=5, values="normalized")
    assert check_member(small_adata, tasks=[RESP], rules=rules).fit


def test_many_values_say_how_many_were_looked_at():
    big = ad.AnnData(
        X=np.full((500, 300), 0.5, dtype=np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(300)])
    )
    ((problem, _),) = count_findings(big.X)
    assert problem.startswith("100000 of the first 100,000 stored values are not whole numbers (e.g. 0.5, 0.5, 0.5)")
