"""One endpoint's statistics end to end in numpy: members' pieces -> sum -> released table; the small-cell rule,
rows withheld below min_members, subgroups by region against statsmodels OLS, pseudobulk samples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from omics.design import DesignSpec
from omics.statistics import (
    EndpointDesign,
    design_columns,
    endpoint_statistics,
    rank_genes_groups_record,
    site_statistics,
)

P = 40
NAMES = [f"G{j}" for j in range(P)]
SPEC = DesignSpec(formula="~ endpoint + age + sex", numeric=("age",), categorical={"sex": ("F", "M")})
REGIONS = ("EU", "US", "APAC")


def _member(rng, n, *, kind="binary", positives=None, shift=0.0, region_effect=0.0):
    obs = pd.DataFrame(
        {"age": rng.normal(60, 9, n).round(), "sex": rng.choice(["F", "M"], n)}, index=[f"s{i}" for i in range(n)]
    )
    Y = rng.normal(2.0 + shift, 1.0, size=(n, P)) + 0.02 * obs["age"].to_numpy()[:, None]
    if kind == "binary":
        y = np.zeros(n)
        y[rng.permutation(n)[: positives if positives is not None else n // 2]] = 1.0
        Y[:, :3] += (0.8 + region_effect) * y[:, None]
    else:
        y = rng.normal(size=n)
        Y[:, :3] += (0.5 + region_effect) * y[:, None]
    return Y, y, obs


def _summed(pieces):
    pieces = [p for p in pieces if p is not None]
    return {key: np.sum([p[key] for p in pieces], axis=0) for key in pieces[0]}


def test_a_member_below_the_small_cell_rule_sends_nothing():
    rng = np.random.default_rng(1)
    Y, y, obs = _member(rng, 40, positives=2)
    assert site_statistics(Y, y, obs, kind="binary", design=EndpointDesign(spec=SPEC, min_cell=5)) is None
    Y, y, obs = _member(rng, 40, positives=5)
    pieces = site_statistics(Y, y, obs, kind="binary", design=EndpointDesign(spec=SPEC, min_cell=5))
    assert pieces is not None and pieces["samples"][0] == 40


def test_rows_measured_by_fewer_than_min_members_are_withheld_and_counted():
    rng = np.random.default_rng(2)
    design = EndpointDesign(spec=SPEC)
    pieces = []
    for index, n in enumerate((50, 60, 70)):
        Y, y, obs = _member(rng, n)
        measured = np.ones(P, dtype=bool)
        if index == 2:
            measured[[5, 6]] = False  # measured by two members only
        pieces.append(site_statistics(Y, y, obs, kind="binary", design=design, measured=measured))
    released = endpoint_statistics(_summed(pieces), kind="binary", spec=SPEC, feature_names=NAMES, min_members=3)
    assert released.withheld == 2 and not {"G5", "G6"} & set(released.table["feature"])
    assert len(released.table) == P - 2 and set(released.table["members"]) == {3}
    open_rule = endpoint_statistics(_summed(pieces), kind="binary", spec=SPEC, feature_names=NAMES, min_members=2)
    assert open_rule.withheld == 0 and {"G5", "G6"} <= set(open_rule.table["feature"])
    assert released.table.iloc[0]["feature"] in {"G0", "G1", "G2"}  # the planted ones lead


def test_markers_up_and_down_follow_scanpys_order():
    rng = np.random.default_rng(3)
    Y, y, obs = _member(rng, 80)
    Y[:, 10] -= 0.9 * y  # lower in the class
    pieces = site_statistics(Y, y, obs, kind="binary", design=EndpointDesign(spec=SPEC))
    released = endpoint_statistics(pieces, kind="binary", spec=SPEC, feature_names=NAMES)
    up, down = released.markers(direction="up"), released.markers(direction="down")
    assert set(up["feature"].head(3)) == {"G0", "G1", "G2"} and down["feature"].iloc[0] == "G10"
    assert (up["logFC"] > 0).all() and (down["logFC"] < 0).all()
    assert list(up["t"]) == sorted(up["t"], reverse=True)
    record = rank_genes_groups_record(released.table, group="resp", kind="binary")
    assert list(record["names"]["resp"][:3]) == list(up["feature"].head(3))
    assert record["names"]["resp"][-1] == "G10"


def test_subgroups_by_region_match_statsmodels_ols_with_the_interaction():
    rng = np.random.default_rng(4)
    spec = DesignSpec(formula=SPEC.formula, numeric=SPEC.numeric, categorical=SPEC.categorical, regions=REGIONS)
    assert design_columns(spec, kind="regression")[-2:] == ["endpoint:region[US]", "endpoint:region[APAC]"]
    members = [("EU", 40, 0.0), ("US", 50, 0.6), ("APAC", 45, -0.4), ("EU", 35, 0.0)]
    pieces, frames = [], []
    for index, (region, n, effect) in enumerate(members):
        Y, y, obs = _member(rng, n, kind="regression", shift=0.3 * index, region_effect=effect)
        design = EndpointDesign(spec=spec, region=region)
        pieces.append(site_statistics(Y, y, obs, kind="regression", design=design))
        frames.append(obs.assign(y=y, g0=Y[:, 0], member=f"m{index}", region=region))
    released = endpoint_statistics(_summed(pieces), kind="regression", spec=spec, feature_names=NAMES, min_members=3)
    pooled = pd.concat(frames, ignore_index=True)
    pooled["region"] = pd.Categorical(pooled["region"], categories=list(REGIONS))
    for region in REGIONS[1:]:
        pooled[f"in_{region}"] = pooled["y"] * (pooled["region"] == region)
    ols = smf.ols("g0 ~ y + age + C(sex) + C(member) + in_US + in_APAC", data=pooled).fit()
    test = ols.f_test("in_US = 0, in_APAC = 0")
    row = released.table.set_index("feature").loc["G0"]
    assert row["interaction_F"] == pytest.approx(float(test.fvalue), rel=1e-8)
    assert row["interaction_p"] == pytest.approx(float(test.pvalue), rel=1e-8)
    effects = released.regions[released.regions["feature"] == "G0"].set_index("region")
    assert effects.loc["EU", "effect"] == pytest.approx(ols.params["y"], rel=1e-8)
    assert effects.loc["US", "effect"] == pytest.approx(ols.params["y"] + ols.params["in_US"], rel=1e-8)
    assert 0.0 <= row["I2"] <= 1.0 and row["Q"] > 0
    # the main table is the model without the interaction: the overall effect
    main = smf.ols("g0 ~ y + age + C(sex) + C(member)", data=pooled).fit()
    assert row["logFC"] == pytest.approx(main.params["y"], rel=1e-8)


def test_survival_pieces_need_events_above_the_small_cell_rule():
    rng = np.random.default_rng(5)
    Y, _, obs = _member(rng, 60)
    time = rng.exponential(10, 60).round()
    event = np.zeros(60)
    event[:4] = 1.0
    target = np.column_stack([time + 1, event])
    assert site_statistics(Y, target, obs, kind="survival", design=EndpointDesign(spec=SPEC, min_cell=5)) is None
    event[:12] = 1.0
    pieces = site_statistics(
        Y, np.column_stack([time + 1, event]), obs, kind="survival", design=EndpointDesign(spec=SPEC)
    )
    released = endpoint_statistics(pieces, kind="survival", spec=SPEC, feature_names=NAMES)
    assert {"logHR", "statistic", "P.Value", "adj.P.Val", "events"} <= set(released.table.columns)
    assert set(released.table["events"]) == {12}


def test_survival_without_covariates_releases_with_rows_withheld():
    """q = 0: the Cox pieces of the covariates are empty arrays, and withholding rows must not trip on them."""
    rng = np.random.default_rng(6)
    spec = DesignSpec(formula="~ endpoint")
    pieces = []
    for index in range(3):
        Y, _, obs = _member(rng, 50)
        target = np.column_stack([rng.exponential(10, 50).round() + 1, rng.random(50) < 0.6])
        measured = np.ones(P, dtype=bool)
        measured[7] = index != 0
        pieces.append(
            site_statistics(Y, target, obs, kind="survival", design=EndpointDesign(spec=spec), measured=measured)
        )
    assert pieces[0]["info_xz"].size == 0
    released = endpoint_statistics(_summed(pieces), kind="survival", spec=spec, feature_names=NAMES, min_members=3)
    assert released.withheld == 1 and "G7" not in set(released.table["feature"]) and len(released.table) == P - 1
