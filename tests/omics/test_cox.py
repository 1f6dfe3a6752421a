"""The federated, member-stratified Cox model (Efron ties) equals the pooled statsmodels PHReg analysis."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.duration.hazard_regression import PHReg
from statsmodels.stats.multitest import multipletests

import omics.cox as cox
from omics.cox import (
    COLUMNS,
    FIT_KEYS,
    SCORE_KEYS,
    CoxStep,
    cox_score_table,
    newton_step,
    site_cox_fit_pieces,
    site_cox_score_pieces,
)

P = 50
NAMES = [f"GENE{j:02d}" for j in range(P)]
UNMEASURED = 7  # member 1 did not measure it
SIZES = (140, 90, 60, 35)


def _consortium(seed=3, *, sizes=SIZES):
    """Members of different sizes and baselines, heavy ties (times on a coarse grid), age and sex that
    act on survival, features partly correlated with age and a few with an effect of their own."""
    rng = np.random.default_rng(seed)
    members = []
    for m, n in enumerate(sizes):
        age = rng.normal(62 + 3 * m, 9, n)
        sex = rng.integers(0, 2, n).astype(float)
        X = rng.normal(2.0 + 0.3 * m, 1.0, (n, P)) + 0.03 * (age[:, None] - 60) * (np.arange(P) % 2)
        risk = 0.04 * (age - 60) + 0.6 * sex + 0.5 * (X[:, 0] - X[:, 0].mean()) - 0.4 * (X[:, 1] - X[:, 1].mean())
        event_time = rng.exponential(np.exp(-risk - 0.3 * m))
        censor = rng.exponential(1.5, n)
        time = np.ceil(np.minimum(event_time, censor) * 4) / 4  # quarter-year grid: many tied events
        event = (event_time <= censor).astype(float)
        members.append({"time": time, "event": event, "Z": np.column_stack([age, sex]), "X": X})
    members[1]["X"][:, UNMEASURED] = np.nan
    measured = [np.ones(P, dtype=bool) for _ in members]
    measured[1][UNMEASURED] = False
    return members, measured


def _sum(pieces):
    return {key: np.sum([p[key] for p in pieces], axis=0) for key in pieces[0]}


def _fit(members, *, beta0=None, rounds=50, noise=None):
    """The federated Newton iteration: members' pieces, summed, one step; returns (beta, steps)."""
    q = members[0]["Z"].shape[1]
    beta, previous, steps = (np.zeros(q) if beta0 is None else np.asarray(beta0, float)), None, []
    for _ in range(rounds):
        summed = _sum([site_cox_fit_pieces(m["time"], m["event"], m["Z"], beta) for m in members])
        if noise is not None:
            summed = noise(summed)
        previous = newton_step(summed, beta, previous=previous)
        steps.append(previous)
        beta = previous.beta
        if previous.converged:
            return beta, steps
    raise AssertionError(f"no convergence in {rounds} rounds: {steps[-1]}")


def _scores(members, measured, beta):
    pieces = [
        site_cox_score_pieces(m["X"], m["time"], m["event"], m["Z"], beta, measured=k)
        for m, k in zip(members, measured, strict=True)
    ]
    return _sum(pieces)


def _pooled(members, columns=None):
    keep = range(len(members)) if columns is None else columns
    cat = {key: np.concatenate([members[m][key] for m in keep]) for key in ("time", "event", "Z", "X")}
    cat["strata"] = np.concatenate([np.full(len(members[m]["time"]), m) for m in keep])
    return cat


def _phreg(pooled, Z):
    return PHReg(pooled["time"], Z, status=pooled["event"], strata=pooled["strata"], ties="efron")


def _calpha(pooled, j, beta):
    """statsmodels' score U and information I of [Z, x_j] at (beta, 0): the efficient score statistic."""
    model = _phreg(pooled, np.column_stack([pooled["Z"], pooled["X"][:, j]]))
    params = np.r_[beta, 0.0]
    U, info = model.score(params), -model.hessian(params)
    Uz, Ux, Izz, Ixz, Ixx = U[:-1], U[-1], info[:-1, :-1], info[:-1, -1], info[-1, -1]
    u = Ux - Ixz @ np.linalg.solve(Izz, Uz)
    v = Ixx - Ixz @ np.linalg.solve(Izz, Ixz)
    chi2_at_mle = Ux**2 * np.linalg.inv(info)[-1, -1]
    return u / np.sqrt(v), chi2_at_mle, u / v, 1 / np.sqrt(v)


@pytest.fixture(scope="module")
def consortium():
    members, measured = _consortium()
    beta, steps = _fit(members)
    table = cox_score_table(_scores(members, measured, beta), q=2, feature_names=NAMES).set_index("feature")
    return members, measured, beta, steps, table


def test_the_data_have_heavy_ties(consortium):
    members = consortium[0]
    for m in members:
        event_times = m["time"][m["event"] == 1]
        assert np.unique(event_times).size < event_times.size / 2


def test_federated_newton_fit_equals_stratified_phreg_efron(consortium):
    members, _, beta, steps, _ = consortium
    pooled = _pooled(members)
    model = _phreg(pooled, pooled["Z"])
    reference = model.fit().params
    assert beta == pytest.approx(reference, abs=1e-6, rel=1e-6)
    assert steps[-1].loglik == pytest.approx(model.loglike(beta), rel=1e-10)
    assert len(steps) <= 8 and not any(s.halved for s in steps)
    assert [s.loglik for s in steps] == sorted(s.loglik for s in steps)  # Newton climbs


def test_fit_pieces_are_statsmodels_loglik_score_and_information_at_any_beta(consortium):
    members = consortium[0]
    pooled = _pooled(members)
    model = _phreg(pooled, pooled["Z"])
    beta = np.array([0.1, -0.7])
    summed = _sum([site_cox_fit_pieces(m["time"], m["event"], m["Z"], beta) for m in members])
    assert summed["loglik"][0] == pytest.approx(model.loglike(beta), rel=1e-10)
    assert summed["gradient"] == pytest.approx(model.score(beta), rel=1e-8, abs=1e-8)
    assert summed["information"] == pytest.approx(-model.hessian(beta)[np.triu_indices(2)], rel=1e-8)
    assert summed["events"][0] == pooled["event"].sum() and summed["samples"][0] == pooled["time"].size
    assert all(value.dtype == np.float64 for value in summed.values()) and sorted(summed) == sorted(FIT_KEYS)


def test_fit_equals_lifelines_when_installed(consortium):
    lifelines = pytest.importorskip("lifelines")
    import pandas as pd

    members, _, beta, _, _ = consortium
    pooled = _pooled(members)
    frame = pd.DataFrame(
        {
            "T": pooled["time"],
            "E": pooled["event"],
            "age": pooled["Z"][:, 0],
            "sex": pooled["Z"][:, 1],
            "member": pooled["strata"],
        }
    )
    fitted = lifelines.CoxPHFitter().fit(frame, "T", "E", strata=["member"])
    assert beta == pytest.approx(fitted.params_[["age", "sex"]].to_numpy(), abs=1e-6)


def test_score_test_equals_statsmodels_for_features_every_member_measured(consortium):
    members, _, beta, _, table = consortium
    pooled = _pooled(members)
    for j in [0, 1, 2, 3, 10, 25, 49]:
        z, chi2, log_hr, se = _calpha(pooled, j, beta)
        row = table.loc[NAMES[j]]
        assert row["statistic"] ** 2 == pytest.approx(chi2, rel=1e-6)
        assert row["statistic"] == pytest.approx(z, rel=1e-6)
        assert row["logHR"] == pytest.approx(log_hr, rel=1e-6) and row["se"] == pytest.approx(se, rel=1e-6)
        assert (row["members"], row["samples"], row["events"]) == (4, pooled["time"].size, pooled["event"].sum())
    # the planted effects lead
    assert set(table.index[:2]) == {NAMES[0], NAMES[1]}
    assert table.loc[NAMES[0], "logHR"] > 0 > table.loc[NAMES[1], "logHR"]


def test_feature_unmeasured_at_one_member(consortium):
    """Proven relations for the subset S of members that measured x:

    1. at any beta, the statistic is the efficient score of statsmodels on S's pooled data at (beta, 0);
    2. at S's own MLE (U_z = 0) it is statsmodels' usual score test U_x^2 (I^-1)_xx, so refitting beta on
       S by the same federated Newton steps reproduces the subset analysis exactly;
    3. at the all-member beta (not S's MLE) it differs only to second order in the difference of the betas.
    """
    members, measured, beta, _, table = consortium
    subset = [0, 2, 3]
    pooled = _pooled(members, subset)
    z, _, log_hr, _ = _calpha(pooled, UNMEASURED, beta)
    row = table.loc[NAMES[UNMEASURED]]
    assert row["statistic"] == pytest.approx(z, rel=1e-6)
    assert row["logHR"] == pytest.approx(log_hr, rel=1e-6)
    assert (row["members"], row["samples"]) == (3, pooled["time"].size)

    beta_s, _ = _fit([members[m] for m in subset])
    assert beta_s == pytest.approx(_phreg(pooled, pooled["Z"]).fit().params, abs=1e-6)
    refit = cox_score_table(_scores(members, measured, beta_s), q=2, feature_names=NAMES).set_index("feature")
    _, chi2_s, _, _ = _calpha(pooled, UNMEASURED, beta_s)
    assert refit.loc[NAMES[UNMEASURED], "statistic"] ** 2 == pytest.approx(chi2_s, rel=1e-6)
    # second order: beta moved by ~1e-2, the statistic by far less than its own sampling noise (1)
    assert np.abs(beta - beta_s).max() < 0.1
    assert abs(row["statistic"] - refit.loc[NAMES[UNMEASURED], "statistic"]) < 0.01
    # the naive score (no correction for U_z != 0) is off by first-order terms
    naive = _scores(members, measured, beta)
    j = UNMEASURED
    naive_z = naive["score_x"][j] / np.sqrt(naive["info_xx"][j])
    assert abs(naive_z - row["statistic"]) > abs(row["statistic"] - refit.loc[NAMES[j], "statistic"])


def test_without_covariates_it_is_the_stratified_efron_score_test():
    members, measured = _consortium(seed=8)
    for m in members:
        m["Z"] = np.empty((len(m["time"]), 0))
    beta, steps = _fit(members)
    assert beta.shape == (0,) and steps[0].converged
    table = cox_score_table(_scores(members, measured, beta), q=0, feature_names=NAMES).set_index("feature")
    pooled = _pooled(members)
    for j in [0, 1, 5, 30]:
        model = _phreg(pooled, pooled["X"][:, [j]])
        chi2 = model.score(np.zeros(1))[0] ** 2 / -model.hessian(np.zeros(1))[0, 0]
        assert table.loc[NAMES[j], "statistic"] ** 2 == pytest.approx(chi2, rel=1e-6)
    sub = _pooled(members, [0, 2, 3])
    model = _phreg(sub, sub["X"][:, [UNMEASURED]])
    chi2 = model.score(np.zeros(1))[0] ** 2 / -model.hessian(np.zeros(1))[0, 0]
    assert table.loc[NAMES[UNMEASURED], "statistic"] ** 2 == pytest.approx(chi2, rel=1e-6)


def test_score_pieces_are_the_fit_pieces_with_x_as_one_more_covariate(consortium):
    """Per member, the vectorized pieces equal the fit pieces of [Z, x] at (beta, 0)."""
    members, _, beta, _, _ = consortium
    m = members[2]
    pieces = site_cox_score_pieces(m["X"], m["time"], m["event"], m["Z"], beta)
    assert sorted(pieces) == sorted(SCORE_KEYS)
    for j in [0, 13, 49]:
        fit = site_cox_fit_pieces(m["time"], m["event"], np.column_stack([m["Z"], m["X"][:, j]]), np.r_[beta, 0.0])
        info = np.zeros((3, 3))
        info[np.triu_indices(3)] = fit["information"]
        assert pieces["score_x"][j] == pytest.approx(fit["gradient"][2], rel=1e-9, abs=1e-9)
        assert pieces["info_xx"][j] == pytest.approx(info[2, 2], rel=1e-9)
        assert pieces["info_xz"].reshape(P, 2)[j] == pytest.approx(info[:2, 2], rel=1e-9)
        assert pieces["score_z"].reshape(P, 2)[j] == pytest.approx(fit["gradient"][:2], rel=1e-9, abs=1e-9)
        assert pieces["info_zz"].reshape(P, 3)[j] == pytest.approx(fit["information"][[0, 1, 3]], rel=1e-9)


def test_blocks_of_features_give_the_same_pieces(consortium, monkeypatch):
    members, _, beta, _, _ = consortium
    m = members[0]
    whole = site_cox_score_pieces(m["X"], m["time"], m["event"], m["Z"], beta)
    monkeypatch.setattr(cox, "_BLOCK_ELEMENTS", 3 * len(m["time"]))  # blocks of 3 features
    blocked = site_cox_score_pieces(m["X"], m["time"], m["event"], m["Z"], beta)
    for key in SCORE_KEYS:
        assert blocked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)


def test_unmeasured_constant_and_eventless_members_contribute_nothing(consortium):
    members, measured, beta, _, _ = consortium
    m = members[1]
    X = m["X"].copy()
    X[:, 3] = 4.2  # constant at this member
    pieces = site_cox_score_pieces(X, m["time"], m["event"], m["Z"], beta, measured=measured[1])
    for key in SCORE_KEYS:
        rows = pieces[key].reshape(P, -1)
        assert not rows[[3, UNMEASURED]].any(), key
    assert pieces["members"].sum() == P - 2
    none = site_cox_score_pieces(m["X"][:, :5], m["time"], np.zeros_like(m["event"]), m["Z"], beta)
    assert not any(v.any() for v in none.values())
    fit = site_cox_fit_pieces(m["time"], np.zeros_like(m["event"]), m["Z"], beta)
    assert fit["samples"][0] == len(m["time"]) and not fit["gradient"].any() and fit["loglik"][0] == 0.0


def test_table_columns_order_and_bh(consortium):
    table = consortium[4].reset_index()
    assert list(table.columns) == COLUMNS and len(table) == P
    assert table["P.Value"].is_monotonic_increasing
    bh = multipletests(table["P.Value"], method="fdr_bh")[1]
    assert table["adj.P.Val"].to_numpy() == pytest.approx(bh, rel=1e-12)


def test_ckks_like_noise_changes_nothing_that_matters(consortium):
    """Sums carry relative noise ~1e-9 and zero sums decrypt to small non-zeros."""
    members, measured, beta, _, table = consortium
    rng = np.random.default_rng(0)

    def noisy(summed):
        return {
            k: v * (1 + 1e-9 * rng.standard_normal(v.shape)) + 1e-9 * rng.standard_normal(v.shape)
            for k, v in summed.items()
        }

    beta_noisy, _ = _fit(members, noise=noisy)
    assert beta_noisy == pytest.approx(beta, abs=1e-6)
    summed = noisy(_scores(members, measured, beta))
    summed["members"][5] = 1e-9  # a feature nobody measured
    noisy_table = cox_score_table(summed, q=2, feature_names=NAMES).set_index("feature")
    assert NAMES[5] not in noisy_table.index
    kept = noisy_table.index
    assert noisy_table["statistic"].to_numpy() == pytest.approx(table.loc[kept, "statistic"].to_numpy(), rel=1e-5)


def test_feature_collinear_with_a_covariate_has_no_test(consortium):
    members, _, beta, _, _ = consortium
    pieces = []
    for m in members:
        X = np.column_stack([m["Z"][:, 0] / 10.0, m["X"][:, 0]])  # age in decades
        pieces.append(site_cox_score_pieces(X, m["time"], m["event"], m["Z"], beta))
    table = cox_score_table(_sum(pieces), q=2, feature_names=["age10", "g"]).set_index("feature")
    assert np.isnan(table.loc["age10", "P.Value"]) and np.isfinite(table.loc["g", "P.Value"])
    assert table.index[-1] == "age10"


def test_step_halving_recovers_from_a_far_start(consortium):
    members, _, beta, _, _ = consortium
    beta_far, steps = _fit(members, beta0=[0.5, -6.0])
    assert beta_far == pytest.approx(beta, abs=1e-6)
    # a step whose log likelihood fell goes halfway back to the last accepted beta
    summed = _sum([site_cox_fit_pieces(m["time"], m["event"], m["Z"], np.array([1.0, 1.0])) for m in members])
    previous = CoxStep(np.array([1.0, 1.0]), 1.0, -100.0, False, np.array([0.0, 0.0]), -100.0)
    halved = newton_step(summed, np.array([1.0, 1.0]), previous=previous)
    assert halved.halved and halved.beta == pytest.approx([0.5, 0.5]) and not halved.converged


def test_singular_information_names_the_covariates(consortium):
    members = consortium[0]
    pieces = []
    for m, member in enumerate(members):
        Z = np.column_stack([member["Z"], np.full(len(member["time"]), float(m))])  # constant in each stratum
        pieces.append(site_cox_fit_pieces(member["time"], member["event"], Z, np.zeros(3)))
    with pytest.raises(ValueError, match=r"\['site'\] are not estimable"):
        newton_step(_sum(pieces), np.zeros(3), names=["age", "sex", "site"])
    pieces = [
        site_cox_fit_pieces(m["time"], m["event"], np.column_stack([m["Z"], 2 * m["Z"][:, 1]]), np.zeros(3))
        for m in members
    ]
    with pytest.raises(ValueError, match=r"\['sex', 'sex2'\] are not estimable"):
        newton_step(_sum(pieces), np.zeros(3), names=["age", "sex", "sex2"])


def test_bad_input_raises_naming_the_argument(consortium):
    m = consortium[0][0]
    t, e, Z, X = m["time"], m["event"], m["Z"], m["X"]
    n = len(t)
    with pytest.raises(ValueError, match=r"time must be .*non-finite"):
        site_cox_fit_pieces(np.r_[t[:-1], np.nan], e, Z, np.zeros(2))
    with pytest.raises(ValueError, match=r"event must be .*0/1"):
        site_cox_fit_pieces(t, e * 2, Z, np.zeros(2))
    with pytest.raises(ValueError, match=rf"Z must be \({n}, q\)"):
        site_cox_fit_pieces(t, e, Z[:-1], np.zeros(2))
    with pytest.raises(ValueError, match=r"beta must be \(2,\)"):
        site_cox_fit_pieces(t, e, Z, np.zeros(3))
    with pytest.raises(ValueError, match=r"X must be 2-D"):
        site_cox_score_pieces(X[:-1], t, e, Z, np.zeros(2))
    with pytest.raises(ValueError, match=r"measured must be a bool array of shape \(50,\)"):
        site_cox_score_pieces(X, t, e, Z, np.zeros(2), measured=np.ones(P))
    X_nan = X.copy()
    X_nan[0, 4] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(first: column 4\)"):
        site_cox_score_pieces(X_nan, t, e, Z, np.zeros(2))
    fit = site_cox_fit_pieces(t, e, Z, np.zeros(2))
    with pytest.raises(ValueError, match=r"summed\['gradient'\] must have shape \(3,\)"):
        newton_step(fit, np.zeros(3))
    with pytest.raises(ValueError, match=r"names must hold 2"):
        newton_step(fit, np.zeros(2), names=["age"])
    scores = site_cox_score_pieces(X, t, e, Z, np.zeros(2))
    with pytest.raises(ValueError, match=r"summed\['info_xz'\] must hold 150 values"):
        cox_score_table(scores, q=3, feature_names=NAMES)
    with pytest.raises(ValueError, match=r"summed\['score_x'\] must hold 49"):
        cox_score_table(scores, q=2, feature_names=NAMES[:-1])
    with pytest.raises(ValueError, match=r"q must be"):
        cox_score_table(scores, q=-1, feature_names=NAMES)
