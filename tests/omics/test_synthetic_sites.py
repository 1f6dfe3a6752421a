"""The synthetic site-selection consortium: sponsors' past sites with known enrollment effects."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from omics.synthetic_sites import EFFECTS, FRAILTY_SHAPE, NUISANCE, WINDOW_MONTHS, make_sites_consortium, true_rate

SIZES = (150, 300, 600)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory):
    return make_sites_consortium(tmp_path_factory.mktemp("sites"), sizes=SIZES, seed=5)


@pytest.fixture(scope="module")
def pooled(sites) -> pd.DataFrame:
    frames = []
    for member in sites.members:
        obs = ad.read_h5ad(member.path).obs.copy()
        obs["member"] = member.name
        frames.append(obs)
    return pd.concat(frames)


def test_members_hold_obs_only_with_both_endpoints_and_some_missing_values(sites):
    assert [m.name for m in sites.members] == ["sponsor-a", "sponsor-b", "sponsor-c"]
    assert [m.region for m in sites.members] == ["APAC", "US", "EU"]
    for member, n in zip(sites.members, SIZES, strict=True):
        adata = ad.read_h5ad(member.path)
        assert adata.shape == (n, 0)
        obs = adata.obs
        assert {"enrolled_per_month", "non_enrolling", "split", *EFFECTS, *NUISANCE} <= set(obs.columns)
        # whole patients over the window; non-enrolling exactly where none came
        patients = obs["enrolled_per_month"].to_numpy() * WINDOW_MONTHS
        np.testing.assert_allclose(patients, np.round(patients), atol=1e-3)
        assert (obs["non_enrolling"] == (obs["enrolled_per_month"] == 0)).all()
        assert 0.05 < obs["non_enrolling"].mean() < 0.25  # "up to 11% of sites enroll no patient"
        missing = obs.isna().sum()
        assert missing[missing > 0].index.tolist() == ["staff", "years_active"]
        current = ad.read_h5ad(member.current)
        assert current.n_vars == 0 and not {"enrolled_per_month", "non_enrolling"} & set(current.obs.columns)


def test_ground_truth_holds_each_sites_true_rate(sites):
    truth = json.loads(sites.ground_truth_path.read_text())
    effects = {e["column"]: e["effect"] for e in truth["effects"]}
    assert effects["competing_trials"] < 0 < effects["past_enrollment_rate"]
    assert len(truth["nuisance"]) >= 3
    for member in sites.members:
        obs = ad.read_h5ad(member.path).obs
        entry = truth["members"][member.name]
        mu = true_rate(obs, baseline=entry["baseline_rate_per_month"])
        np.testing.assert_allclose([entry["sites"][s]["mu"] for s in obs.index], mu, atol=1e-4)
        assert list(entry["current"]) == list(ad.read_h5ad(member.current).obs.index)


def test_a_negative_binomial_fit_finds_the_planted_effects_and_no_nuisance_effect(pooled: pd.DataFrame):
    design = pd.DataFrame(
        {
            "past_enrollment_rate": np.log(pooled["past_enrollment_rate"]),
            "competing_trials": pooled["competing_trials"],
            "staff": pooled["staff"].fillna(4.0),
            "years_active": pooled["years_active"].fillna(13.0),
            "oncology": (pooled["specialty"] == "oncology").astype(float),
            "cardiology": (pooled["specialty"] == "cardiology").astype(float),
            "beds": np.log(pooled["beds"]),
            "academic": (pooled["academic"] == "yes").astype(float),
            "epic": (pooled["records_system"] == "epic").astype(float),
        }
    )
    design = pd.concat([design, pd.get_dummies(pooled["member"], drop_first=True, dtype=float)], axis=1)
    counts = np.round(pooled["enrolled_per_month"].to_numpy() * WINDOW_MONTHS)
    family = sm.families.NegativeBinomial(alpha=1 / FRAILTY_SHAPE)
    fit = sm.GLM(counts, sm.add_constant(design), family=family).fit()
    for column in ("past_enrollment_rate", "competing_trials", "staff", "years_active"):
        assert abs(fit.params[column] - EFFECTS[column]["effect"]) < 0.06, (column, fit.params[column])
        assert fit.pvalues[column] < 1e-3, column
    assert fit.params["oncology"] < 0 < fit.params["cardiology"]
    assert (fit.pvalues[["beds", "academic", "epic"]] > 0.01).all(), fit.pvalues


def test_sponsors_differ_in_baseline_and_mix(sites, pooled: pd.DataFrame):
    truth = json.loads(sites.ground_truth_path.read_text())
    assert len({truth["members"][m.name]["baseline_rate_per_month"] for m in sites.members}) == 3
    oncology = pooled.groupby("member")["specialty"].apply(lambda s: (s == "oncology").mean())
    assert oncology["sponsor-a"] > oncology["sponsor-b"] + 0.15


def test_the_same_seed_writes_the_same_sites(tmp_path: Path, sites):
    again = make_sites_consortium(tmp_path, sizes=SIZES, seed=5)
    pd.testing.assert_frame_equal(ad.read_h5ad(again.members[1].path).obs, ad.read_h5ad(sites.members[1].path).obs)
    assert again.ground_truth_path.read_text() == sites.ground_truth_path.read_text()
