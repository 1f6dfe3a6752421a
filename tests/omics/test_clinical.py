"""Clinical model inputs (panel.clinical): one encoding at every member, the missing rule, the refusals,
scaling from the training split only, a clinical-only member, and a sparse member's clinical block."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jobs.member_data import scaling_pieces
from models.data import MemberData, ScaledRows, TaskSpec
from omics.clinical import ClinicalBlock, encode_clinical
from omics.contract import ContractRules, check_member
from omics.errors import ContractError
from omics.prepare import log_expression, member_arrays, panel_scaling, prepare_member
from schema.clinical import ClinicalFeature
from schema.config import config_from_dict
from schema.errors import ConfigError

PANEL = [f"G{i}" for i in range(6)]
AGE = ClinicalFeature(column="age", type="numeric", range=[18, 100], missing="indicator")
SEX = ClinicalFeature(column="sex", type="categorical", levels=["F", "M"], missing="indicator")
STAGE = ClinicalFeature(column="stage", type="categorical", levels=["1", "2", "3"])


class Resp:
    name, type, column, positive = "resp", "binary", "response", None


def member(n: int = 40, *, seed: int = 0, split: bool = True, **columns) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "response": np.arange(n) % 2 * 1.0,
            "age": rng.uniform(30, 80, n).round(1),
            "sex": np.where(np.arange(n) % 3 == 0, "F", "M"),
            "stage": (np.arange(n) % 3 + 1).astype(float),  # 1.0, 2.0, 3.0: matched as '1', '2', '3'
        },
        index=[f"s{i}" for i in range(n)],
    )
    if split:
        obs["split"] = np.where(np.arange(n) < n // 2, "train", np.where(np.arange(n) % 2 == 0, "val", "test"))
    for name, values in columns.items():
        obs[name] = values
    X = rng.poisson(20, size=(n, len(PANEL))).astype(np.float32)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=PANEL))


def rules(*clinical, panel=PANEL) -> ContractRules:
    return ContractRules(panel=panel, clinical=clinical, min_class_count=3)


def prepare(adata: ad.AnnData, *clinical, panel=PANEL) -> ad.AnnData:
    return prepare_member(
        adata, tasks=[Resp()], rules=rules(*clinical, panel=panel), val_fraction=0.2, test_fraction=0.2, seed=0
    )


def test_inputs_follow_the_panel_in_declaration_order_and_a_member_lacking_a_level_keeps_its_column():
    only_m = member(sex=["M"] * 40)
    prepared = prepare(only_m, AGE, SEX, STAGE)
    arrays = member_arrays(prepared, tasks=[Resp()])
    names = arrays["feature_names"]
    assert names == [*PANEL, "age", "age (missing)", "sex=F", "sex=M", "sex (missing)", "stage=1", "stage=2", "stage=3"]
    X = arrays["X"]
    np.testing.assert_array_equal(X[:, names.index("sex=F")], 0.0)  # no F here: the column all zeros
    np.testing.assert_array_equal(X[:, names.index("sex=M")], 1.0)
    stage = X[:, names.index("stage=1") :]
    np.testing.assert_array_equal(stage.sum(axis=1), 1.0)
    np.testing.assert_array_equal(stage[:3], np.eye(3))
    assert panel_scaling(prepared)["features"] == names
    assert log_expression(prepared).shape == (40, len(PANEL))  # statistics see the omics panel only


def test_a_missing_value_gets_its_indicator_and_the_training_mean():
    age = np.linspace(30, 69, 40)
    age[[0, 30]] = np.nan  # a training sample and a held-out one
    sex = np.array(["F", "M"] * 20, dtype=object)
    sex[5] = None
    prepared = prepare(member(age=age, sex=sex), AGE, SEX)
    arrays = member_arrays(prepared, tasks=[Resp()])
    X, names = arrays["X"], arrays["feature_names"]
    train_mean = np.nanmean(age[:20])
    assert prepared.uns["clinical"]["mean"][0] == pytest.approx(train_mean)
    assert X[0, names.index("age")] == 0.0 and X[30, names.index("age")] == 0.0  # the mean: 0 once scaled
    np.testing.assert_array_equal(np.flatnonzero(X[:, names.index("age (missing)")]), [0, 30])
    np.testing.assert_array_equal(X[5, names.index("sex=F") :], [0.0, 0.0, 1.0])
    assert X[4, names.index("sex=F")] == 1.0 and X[4, names.index("sex (missing)")] == 0.0


def test_numeric_scaling_comes_from_the_training_split_only():
    age = np.r_[np.linspace(20, 60, 20), np.full(20, 99.0)]  # validation and test samples far off
    prepared = prepare(member(age=age), AGE)
    scaling = panel_scaling(prepared)
    j = scaling["features"].index("age")
    assert scaling["mean"][j] == pytest.approx(40.0, rel=1e-6)
    assert scaling["std"][j] == pytest.approx(np.linspace(20, 60, 20).std(ddof=1), rel=1e-6)
    k = scaling["features"].index("age (missing)")
    assert (scaling["mean"][k], scaling["std"][k], scaling["measured"][k]) == (0.0, 1.0, True)
    X = member_arrays(prepared, tasks=[Resp()])["X"]
    assert X[:20, j].mean() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(X[20:, j], (99.0 - 40.0) / scaling["std"][j], rtol=1e-5)


@pytest.mark.parametrize(
    ("columns", "declared", "message", "fix"),
    [
        ({"sex": ["F", "M", "U", "M"] * 10}, SEX, r"levels \['U'\] in 10 samples, not among .*\['F', 'M'\]", "recode"),
        ({"age": [17.0, 40.0, 120.0, 50.0] * 10}, AGE, r"20 values outside the declared range \[18, 100\]", "widen"),
        ({"age": ["40", "old", "55", "60"] * 10}, AGE, r"non-numeric values, e.g. \['old'\]", "encode the column"),
        (
            {"age": [40.0, np.nan, 50.0, 60.0] * 10},
            ClinicalFeature(column="age", type="numeric"),
            "10 missing values and declares missing: refuse",
            "missing: indicator",
        ),
        ({}, ClinicalFeature(column="bmi", type="numeric"), r"needs column 'bmi' in obs; found: response", "add 'bmi'"),
    ],
)
def test_the_contract_refuses_what_the_declaration_does_not_allow(columns, declared, message, fix):
    adata = member(**columns)
    report = check_member(adata, tasks=[Resp()], rules=rules(declared), path="data/m1.h5ad")
    [finding] = [f for f in report.findings if f.level == "error"]
    assert finding.field == f"obs.{declared.column}"
    assert re.search(message, finding.message), finding.message
    assert fix in finding.fix
    with pytest.raises(ContractError, match=rf"data/m1.h5ad is not fit to join:\n  obs.{declared.column}: "):
        prepare_member(
            adata,
            tasks=[Resp()],
            rules=rules(declared),
            val_fraction=0.2,
            test_fraction=0.2,
            seed=0,
            path="data/m1.h5ad",
        )


def test_a_clinical_only_member_needs_no_features():
    adata = member()[:, []].copy()  # no var at all
    report = check_member(adata, tasks=[Resp()], rules=rules(AGE, SEX, panel=[]))
    assert report.fit, report.findings
    prepared = prepare(adata, AGE, SEX, panel=[])
    arrays = member_arrays(prepared, tasks=[Resp()])
    assert arrays["feature_names"] == ["age", "age (missing)", "sex=F", "sex=M", "sex (missing)"]
    assert arrays["X"].shape == (40, 5)
    assert log_expression(prepared).shape == (40, 0)
    with_features = prepare(member(), AGE, SEX, panel=[])  # features the consortium does not declare: no input
    np.testing.assert_array_equal(member_arrays(with_features, tasks=[Resp()])["X"], arrays["X"])


def test_a_sparse_member_scales_its_clinical_block_as_the_dense_one():
    dense = member()
    sparse = dense.copy()
    sparse.X = sp.csr_matrix(dense.X)
    arrays = {}
    for name, adata in (("dense", dense), ("sparse", sparse)):
        prepared = prepare(adata, AGE, SEX)
        arrays[name] = member_arrays(prepared, tasks=[Resp()])
        arrays[name]["scaling"] = panel_scaling(prepared)
    s = arrays["sparse"]["scaling"]
    rows = ScaledRows(arrays["sparse"]["X"], mean=s["mean"], std=s["std"], max_value=s["max_value"])
    np.testing.assert_allclose(rows.dense(), arrays["dense"]["X"], rtol=1e-5, atol=1e-5)


def test_pooled_scaling_pieces_count_measured_values_and_send_no_level_counts():
    age = np.linspace(30, 69, 40)
    age[0] = np.nan
    prepared = prepare(member(age=age), AGE, SEX)
    data = MemberData(**member_arrays(prepared, tasks=[Resp()]))
    info = prepared.uns["clinical"]
    block = ClinicalBlock(list(info["names"]), list(info["kinds"]), np.asarray(prepared.obsm["clinical"]))
    pieces = scaling_pieces(
        data,
        log_expression(prepared),
        prepared.var["measured"].to_numpy(),
        tasks=[TaskSpec("resp", "binary")],
        minimum=5,
        clinical=block,
    )
    p = len(PANEL)
    np.testing.assert_array_equal(pieces["scaling.features.samples"][p:], [19, 20, 20, 20, 20])
    assert pieces["scaling.features.sum"][p] == pytest.approx(np.nansum(age[:20]))
    np.testing.assert_array_equal(pieces["scaling.features.sum"][p + 1 :], 0.0)


def test_encoding_is_the_same_for_any_order_of_samples():
    adata = member()
    block = encode_clinical(adata.obs, [SEX, STAGE])
    reversed_block = encode_clinical(adata.obs.iloc[::-1], [SEX, STAGE])
    np.testing.assert_array_equal(block.values[::-1], reversed_block.values)


def config_with(small_config_dict: dict, **panel) -> dict:
    return {**small_config_dict, "panel": panel}


def test_config_names_the_model_inputs_and_keeps_the_panel_omics_only(small_config_dict, tmp_path: Path):
    clinical = [
        {"column": "age", "type": "numeric", "range": [18, 100], "missing": "indicator"},
        {"column": "sex", "type": "categorical", "levels": ["F", "M"]},
    ]
    config = config_from_dict(
        config_with(small_config_dict, features=["GENE1", "GENE2"], clinical=clinical), source=tmp_path / "c.yaml"
    )
    assert config.panel_features() == ["GENE1", "GENE2"]
    assert config.clinical_features() == ["age", "age (missing)", "sex=F", "sex=M"]
    assert config.model_features() == ["GENE1", "GENE2", "age", "age (missing)", "sex=F", "sex=M"]
    alone = config_from_dict(config_with(small_config_dict, clinical=clinical), source=tmp_path / "c.yaml")
    assert alone.panel_features() == [] and alone.model_features() == ["age", "age (missing)", "sex=F", "sex=M"]


@pytest.mark.parametrize(
    ("panel", "message"),
    [
        ({}, "give the panel 'features'"),
        ({"clinical": [{"column": "sex", "type": "categorical"}]}, "is categorical: declare its levels"),
        ({"clinical": [{"column": "age", "type": "numeric", "levels": ["a", "b"]}]}, "is numeric: remove 'levels'"),
        ({"clinical": [{"column": "age", "type": "numeric", "range": [100, 18]}]}, "low < high"),
        ({"clinical": [{"column": "response", "type": "numeric"}]}, "which task 'resp' of member 'm1' reads"),
        (
            {"features": ["sex=F"], "clinical": [{"column": "sex", "type": "categorical", "levels": ["F", "M"]}]},
            "both name the model inputs",
        ),
        ({"clinical": [{"column": "age", "type": "numeric"}] * 2}, "repeated: \\['age'\\]"),
    ],
)
def test_config_refuses_a_bad_clinical_declaration(small_config_dict, tmp_path: Path, panel, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config_with(small_config_dict, **panel), source=tmp_path / "c.yaml")
