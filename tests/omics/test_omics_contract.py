import numpy as np
import pytest

from omics.contract import ContractRules, check_member
from omics.errors import ContractError
from omics.harmonize import harmonize_to_panel
from omics.normalize import normalize
from omics.prepare import member_arrays, prepare_member
from omics.split import assign_split


class Task:
    def __init__(self, **kw):
        self.__dict__.update(kw)


TASKS = [
    Task(name="resp", type="binary", column="response"),
    Task(name="lvl", type="regression", column="level"),
    Task(name="os", type="survival", time="os_days", event="os_event"),
]
PANEL = [f"GENE{i}" for i in range(40)]


def rules(**kw):
    base = dict(panel=PANEL, min_class_count=5, min_events=5, min_labeled=10)
    return ContractRules(**{**base, **kw})


def errors(report):
    return {(f.field, f.message) for f in report.findings if f.level == "error"}


def test_clean_data_is_fit(small_adata):
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert report.fit, report.findings
    assert report.coverage == 1.0
    assert report.tasks["resp"]["positives"] + report.tasks["resp"]["negatives"] == 80


def test_low_coverage_is_an_error(small_adata):
    report = check_member(small_adata[:, :20].copy(), tasks=TASKS, rules=rules(min_coverage=0.8))
    assert not report.fit
    assert any("covers 50.0%" in m for _, m in errors(report))


def test_mixed_identifiers_are_an_error(small_adata):
    names = list(small_adata.var_names)
    names[0] = "ENSG00000141510"
    small_adata.var_names = names
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert any("mixed identifier kinds: 39 gene symbols and 1 Ensembl" in m for _, m in errors(report))


def test_nan_negative_and_duplicates(small_adata):
    small_adata.X[0, 0] = np.nan
    small_adata.X[1, 1] = -3
    small_adata.obs_names = ["dup"] * 2 + list(small_adata.obs_names[2:])
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    messages = " | ".join(m for _, m in errors(report))
    assert "1 NaN and 0 infinite" in messages
    assert "1 negative values" in messages
    assert "duplicate sample IDs" in messages


def test_task_typing_and_quorum(small_adata):
    small_adata.obs["response"] = 2.0
    small_adata.obs["os_days"] = 0.0
    small_adata.obs = small_adata.obs.drop(columns=["level"])
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    fields = {f for f, _ in errors(report)}
    assert {"obs.response", "obs.level", "obs.os_days"} <= fields


def test_quorum_counts_each_class(small_adata):
    small_adata.obs["response"] = [1.0] * 3 + [0.0] * 77
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert any("3 positives and 77 negatives; the quorum is 5" in m for _, m in errors(report))


def test_harmonize_orders_and_masks_without_silent_padding(small_adata):
    reordered = small_adata[:, ::-1][:, :30].copy()  # GENE39..GENE10
    out = harmonize_to_panel(reordered, panel=PANEL)
    assert list(out.var_names) == PANEL
    assert out.var["measured"].sum() == 30
    assert not out.var.loc["GENE0", "measured"]
    assert out.uns["harmonization"]["n_unmeasured"] == 10
    np.testing.assert_array_equal(out[:, "GENE15"].X.ravel(), reordered[:, "GENE15"].X.ravel())
    with pytest.raises(ContractError, match="covers 75.0%"):
        harmonize_to_panel(reordered, panel=PANEL, min_coverage=0.9)


def test_normalize_records_parameters(small_adata):
    out = normalize(small_adata, copy=True)
    assert out.uns["normalization"]["steps"][:2] == ["normalize_total(target_sum=10000)", "log1p"]
    np.testing.assert_allclose(out.X.mean(axis=0), 0.0, atol=1e-5)
    assert "norm_mean" in out.var and (out.var["norm_std"] > 0).all()


def test_split_is_stratified_and_reproducible(small_adata):
    a = assign_split(small_adata, tasks=TASKS, val_fraction=0.2, test_fraction=0.2, seed=1, copy=True)
    b = assign_split(small_adata, tasks=TASKS, val_fraction=0.2, test_fraction=0.2, seed=1, copy=True)
    c = assign_split(small_adata, tasks=TASKS, val_fraction=0.2, test_fraction=0.2, seed=2, copy=True)
    assert (a.obs["split"] == b.obs["split"]).all()
    assert (a.obs["split"] != c.obs["split"]).any()
    counts = a.obs["split"].value_counts()
    assert 12 <= counts["test"] <= 20 and 12 <= counts["val"] <= 20
    assert a.uns["split"]["stratified_by"] == ["resp", "os"]


def test_prepare_member_to_arrays(small_adata):
    prepared = prepare_member(small_adata, tasks=TASKS, rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0)
    arrays = member_arrays(prepared, tasks=TASKS)
    assert arrays["X"].shape == (80, 40) and arrays["X"].dtype == np.float32
    assert arrays["targets"]["os"].shape == (80, 2)
    assert set(arrays["split"]) == {"train", "val", "test"}


def test_prepare_member_refuses_unfit_data(small_adata):
    small_adata.obs["response"] = 0.0
    with pytest.raises(ContractError, match="obs.response: task 'resp' has 0 positives"):
        prepare_member(
            small_adata, tasks=TASKS, rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0, path="m.h5ad"
        )


def test_scaling_is_fitted_on_the_training_split_only(small_adata):
    split = assign_split(small_adata, tasks=TASKS, val_fraction=0.2, test_fraction=0.2, seed=0, copy=True)
    split.X[(split.obs["split"] == "test").to_numpy(), 0] += 5000  # extreme test values must not shift the scaling
    prepared = prepare_member(split, tasks=TASKS, rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0)
    train = (prepared.obs["split"] == "train").to_numpy()
    np.testing.assert_allclose(prepared.X[train].mean(axis=0), 0.0, atol=1e-4)
    assert prepared.uns["normalization"]["fitted_on"] == "train split"
    assert (prepared.obs["split"] == split.obs["split"]).all()


# -- what a run would fail on later is caught by the check ---------------------------------------


def _prepare(adata):
    return prepare_member(adata, tasks=TASKS, rules=rules(), val_fraction=0.2, test_fraction=0.2, seed=0)


def test_x_beyond_float32_is_an_error_not_a_later_nan(small_adata):
    small_adata.X = small_adata.X.astype(np.float64)
    small_adata.X[0, 0] = 1e39  # finite here, inf once the platform casts X to float32
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert any("1 values beyond the float32 range" in m for f, m in errors(report) if f == "X")
    with pytest.raises(ContractError, match="beyond the float32 range"):
        _prepare(small_adata)


def test_infinite_x_is_an_error(small_adata):
    small_adata.X[3, 3] = np.inf
    report = check_member(small_adata, tasks=TASKS, rules=rules(values="normalized"))
    assert ("X", "0 NaN and 1 infinite values") in errors(report)


@pytest.mark.parametrize("value", [np.inf, 1e39])
def test_unusable_survival_time_is_an_error(small_adata, value):
    small_adata.obs.loc["s0", "os_days"] = value
    small_adata.obs.loc["s0", "os_event"] = 0.0
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert any(
        f == "obs.os_days" and "1 survival times are infinite or beyond the float32 range" in m
        for f, m in errors(report)
    ), errors(report)


def test_regression_target_beyond_float32_is_an_error(small_adata):
    small_adata.obs["level"] = small_adata.obs["level"] * 1e300
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert any(f == "obs.level" and "beyond the float32 range" in m for f, m in errors(report))


def test_stored_split_with_one_training_sample_is_an_error(small_adata):
    small_adata.obs["split"] = ["train"] + ["val"] * 40 + ["test"] * 39
    report = check_member(small_adata, tasks=TASKS, rules=rules())
    assert ("obs.split", "1 'train' sample; the scaling statistics need at least 2") in errors(report)
    with pytest.raises(ContractError, match="1 'train' sample"):
        _prepare(small_adata)
