"""The synthetic trial consortium: clinical-only members whose dropout drivers are what the truth says."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from omics.synthetic_trial import DRIVERS, NUISANCE, TRIAL_MONTHS, make_trial_consortium, true_log_hazard

SIZES = (150, 300, 600)


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory):
    return make_trial_consortium(tmp_path_factory.mktemp("trial"), sizes=SIZES, seed=3)


@pytest.fixture(scope="module")
def pooled(trial) -> pd.DataFrame:
    frames = []
    for member in trial.members:
        obs = ad.read_h5ad(member.path).obs.copy()
        obs["member"] = member.name
        frames.append(obs)
    return pd.concat(frames)


def _design(obs: pd.DataFrame) -> pd.DataFrame:
    """Drivers on the scale they were planted on, nuisance columns beside them (missing values filled)."""
    return pd.DataFrame(
        {
            "distance_km": np.log(obs["distance_km"]),
            "visit_adherence": obs["visit_adherence"].fillna(obs["visit_adherence"].mean()),
            "adverse_events": obs["adverse_events"],
            "age": obs["age"],
            "arm": (obs["arm"] == "treatment").astype(float),
            "bmi": obs["bmi"].fillna(obs["bmi"].mean()),
            "sex": (obs["sex"] == "M").astype(float),
            "smoker": (obs["smoker"] == "yes").astype(float),
            "education_years": obs["education_years"],
            "region": (obs["region"] == "west").astype(float),
        }
    )


def test_members_hold_obs_only_with_endpoints_split_and_some_missing_values(trial):
    assert [m.name for m in trial.members] == ["trial-a", "trial-b", "trial-c"]
    for member, n in zip(trial.members, SIZES, strict=True):
        adata = ad.read_h5ad(member.path)
        assert adata.shape == (n, 0)  # no omics: the model's inputs are the clinical columns
        assert {"dropout_time", "discontinued", "split", *DRIVERS, *NUISANCE} <= set(adata.obs.columns)
        assert {t["name"] for t in member.tasks} == {"discontinued", "dropout"}
        assert set(adata.obs["discontinued"].unique()) == {0.0, 1.0}
        assert adata.obs["dropout_time"].between(0.1, TRIAL_MONTHS).all()
        missing = adata.obs.isna().sum()
        assert missing[missing > 0].index.tolist() == ["visit_adherence", "bmi"]
        assert 0.02 < missing["visit_adherence"] / n < 0.12 and 0.05 < missing["bmi"] / n < 0.16
        assert set(adata.obs["split"].unique()) == {"train", "val", "test"}
        current = ad.read_h5ad(member.current)
        assert current.n_vars == 0 and "discontinued" not in current.obs and "dropout_time" not in current.obs


def test_ground_truth_names_five_signed_drivers_and_every_patients_true_risk(trial):
    truth = json.loads(trial.ground_truth_path.read_text())
    signs = {d["column"]: d["sign"] for d in truth["drivers"]}
    assert signs == {"distance_km": 1, "visit_adherence": -1, "adverse_events": 1, "age": -1, "arm": 1}
    assert len(truth["nuisance"]) >= 3 and not set(truth["nuisance"]) & set(signs)
    assert truth["tasks"]["dropout"] == ["distance_km", "visit_adherence", "adverse_events", "age", "arm=treatment"]
    for member in trial.members:
        obs = ad.read_h5ad(member.path).obs
        risks = truth["members"][member.name]["patients"]
        assert list(risks) == list(obs.index)
        np.testing.assert_allclose([risks[i]["risk"] for i in obs.index], true_log_hazard(obs), atol=1e-5)
        current = ad.read_h5ad(member.current).obs
        assert list(truth["members"][member.name]["current"]) == list(current.index)
    hazards = [truth["members"][m.name]["baseline_hazard_per_month"] for m in trial.members]
    assert len(set(hazards)) == 3  # each member its own baseline hazard


def test_members_mix_patients_differently(pooled: pd.DataFrame):
    distance = pooled.groupby("member")["distance_km"].median()
    assert distance["trial-a"] > 2 * distance["trial-b"]  # a rural member and an urban one
    treated = pooled.groupby("member")["arm"].apply(lambda s: (s == "treatment").mean())
    assert treated["trial-b"] > treated["trial-a"] + 0.1  # one member randomizes 2:1


def test_a_cox_fit_on_the_pooled_patients_finds_the_drivers_signs_and_no_nuisance_effect(pooled: pd.DataFrame):
    design = _design(pooled)
    fit = sm.PHReg(
        pooled["dropout_time"].to_numpy(),
        design.to_numpy(),
        status=pooled["discontinued"].to_numpy(),
        strata=pooled["member"].to_numpy(),
    ).fit()
    coef = pd.Series(fit.params, index=design.columns)
    p = pd.Series(fit.pvalues, index=design.columns)
    for column, spec in DRIVERS.items():
        assert np.sign(coef[column]) == np.sign(spec["effect"]) and p[column] < 1e-4, column
    # five nuisance tests: none below a Bonferroni-sized threshold
    assert (p[["bmi", "sex", "smoker", "education_years", "region"]] > 0.002).all(), p


def test_a_logistic_fit_on_discontinued_finds_the_drivers_signs(pooled: pd.DataFrame):
    design = pd.concat([_design(pooled), pd.get_dummies(pooled["member"], drop_first=True, dtype=float)], axis=1)
    fit = sm.Logit(pooled["discontinued"].to_numpy(), sm.add_constant(design)).fit(disp=0)
    for column, spec in DRIVERS.items():
        assert np.sign(fit.params[column]) == np.sign(spec["effect"]) and fit.pvalues[column] < 1e-3, column


def test_the_same_seed_writes_the_same_consortium_and_another_seed_another(tmp_path: Path, trial):
    again = make_trial_consortium(tmp_path / "again", sizes=SIZES, seed=3)
    other = make_trial_consortium(tmp_path / "other", sizes=SIZES, seed=4)
    first = ad.read_h5ad(trial.members[0].path).obs
    pd.testing.assert_frame_equal(ad.read_h5ad(again.members[0].path).obs, first)
    assert not ad.read_h5ad(other.members[0].path).obs["age"].equals(first["age"])
    assert again.ground_truth_path.read_text() == trial.ground_truth_path.read_text()


def test_too_small_a_member_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"at least one member of >= 100 patients, got \[50, 300\]"):
        make_trial_consortium(tmp_path, sizes=[50, 300])
