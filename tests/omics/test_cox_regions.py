"""Survival subgroups by region: per-region log hazard ratios and the feature x region score test, from the
members' region slots, against statsmodels' stratified Cox model (PHReg, Efron ties) on the pooled data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2
from statsmodels.duration.hazard_regression import PHReg

from omics.design import DesignSpec
from omics.statistics import EndpointDesign, endpoint_statistics, site_statistics

P = 6
NAMES = [f"G{j}" for j in range(P)]
REGIONS = ("EU", "US", "APAC")
SPEC = DesignSpec(formula="~ endpoint + age", numeric=("age",), regions=REGIONS)
MEMBERS = [("EU", 60, 0.0), ("US", 70, 0.8), ("APAC", 55, -0.6), ("EU", 50, 0.0)]


def _member(rng, n, log_hr):
    obs = pd.DataFrame({"age": rng.normal(60, 9, n).round()}, index=[f"s{i}" for i in range(n)])
    Y = rng.normal(0.0, 1.0, size=(n, P))
    hazard = np.exp(0.03 * (obs["age"].to_numpy() - 60) + log_hr * Y[:, 0])
    time = np.ceil(rng.exponential(10.0 / hazard))  # whole units: ties
    event = (rng.random(n) < 0.7).astype(float)
    return Y, np.column_stack([time, event]), obs


def _pooled_beta(frames):
    """The covariates' stratified Cox fit on the pooled data (what the federated Newton steps converge to)."""
    pooled = pd.concat(frames, ignore_index=True)
    model = PHReg(pooled["time"], pooled[["age"]], status=pooled["event"], strata=pooled["member"], ties="efron")
    return model.fit().params


def test_per_region_effects_and_the_interaction_test_equal_statsmodels():
    rng = np.random.default_rng(11)
    data, frames = [], []
    for index, (region, n, log_hr) in enumerate(MEMBERS):
        Y, target, obs = _member(rng, n, log_hr)
        data.append((region, Y, target, obs))
        frames.append(obs.assign(time=target[:, 0], event=target[:, 1], member=f"m{index}", region=region, g0=Y[:, 0]))
    beta = _pooled_beta(frames)
    pieces = [
        site_statistics(Y, target, obs, kind="survival", design=EndpointDesign(spec=SPEC, region=region), cox_beta=beta)
        for region, Y, target, obs in data
    ]
    summed = {key: np.sum([piece[key] for piece in pieces], axis=0) for key in pieces[0]}
    released = endpoint_statistics(summed, kind="survival", spec=SPEC, feature_names=NAMES)

    # statsmodels: one log hazard ratio of g0 per region, beside age; score and information at (gamma=0, beta)
    pooled = pd.concat(frames, ignore_index=True)
    columns = []
    for region in REGIONS:
        pooled[f"g0_{region}"] = pooled["g0"] * (pooled["region"] == region)
        columns.append(f"g0_{region}")
    exog = pooled[[*columns, "age"]].to_numpy()
    model = PHReg(pooled["time"], exog, status=pooled["event"], strata=pooled["member"], ties="efron")
    params = np.r_[np.zeros(len(REGIONS)), np.asarray(beta)]
    score, information = model.score(params), -model.hessian(params)
    g, z = slice(0, len(REGIONS)), slice(len(REGIONS), None)
    projection = information[g, z] @ np.linalg.inv(information[z, z])
    u = score[g] - projection @ score[z]
    V = information[g, g] - projection @ information[z, g]
    ones = np.ones(len(REGIONS))
    statistic = u @ np.linalg.solve(V, u) - (ones @ u) ** 2 / (ones @ V @ ones)

    row = released.table.set_index("feature").loc["G0"]
    assert row["interaction_chi2"] == pytest.approx(statistic, rel=1e-6)
    assert row["interaction_p"] == pytest.approx(chi2.sf(statistic, len(REGIONS) - 1), rel=1e-6)
    effects = released.regions[released.regions["feature"] == "G0"].set_index("region")
    assert list(effects.index) == list(REGIONS)
    np.testing.assert_allclose(effects["effect"].to_numpy(), u / np.diag(V), rtol=1e-6)
    np.testing.assert_allclose(effects["se"].to_numpy(), 1 / np.sqrt(np.diag(V)), rtol=1e-6)
    # the planted effects differ by region (0, +0.8, -0.6): the test sees it, the null features mostly not
    assert row["interaction_p"] < 1e-3 and effects.loc["US", "effect"] > effects.loc["APAC", "effect"]
    assert 0.0 <= row["I2"] <= 1.0
    assert (released.table.set_index("feature").loc[NAMES[1:], "interaction_p"] > 0.001).all()


def test_without_regions_the_survival_table_has_no_subgroup_columns():
    rng = np.random.default_rng(12)
    spec = DesignSpec(formula="~ endpoint + age", numeric=("age",))
    pieces = []
    for _, n, log_hr in MEMBERS:
        Y, target, obs = _member(rng, n, log_hr)
        pieces.append(site_statistics(Y, target, obs, kind="survival", design=EndpointDesign(spec=spec)))
    assert not any(key.startswith("region_") for key in pieces[0])
    summed = {key: np.sum([piece[key] for piece in pieces], axis=0) for key in pieces[0]}
    released = endpoint_statistics(summed, kind="survival", spec=spec, feature_names=NAMES)
    assert released.regions is None and "interaction_p" not in released.table
