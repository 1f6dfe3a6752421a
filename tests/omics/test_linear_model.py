"""Federated limma (omics.linear_model) against limma on the pooled data with a member factor.

References: pylimma (GPL-3.0, a test tool only; here with ``legacy=True``, the estimators of R limma
<= 3.60, which current limma also uses when every feature has the same residual df), R's limma via
``Rscript`` when installed, and statsmodels OLS for the F test.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from omics import linear_model as lm
from omics.contrasts import cochran_q, contrast_effects, f_test
from omics.ebayes import ebayes, fit_f_dist, fit_f_dist_robustly, natural_spline_basis, squeeze_var, trigamma_inverse
from omics.linear_model import (
    LINEAR_KEYS,
    fit_linear_models,
    member_variance_factor,
    site_linear_statistics,
    top_table,
)

pylimma = pytest.importorskip("pylimma")

SIZES = {"A": 40, "B": 25, "C": 15, "D": 30}
REGION = {"A": "EU", "B": "EU", "C": "APAC", "D": "US"}
P = 200
UNMEASURED = ("B", 5)  # member B did not measure feature 5
COLUMNS = ["endpoint", "age", "sexM", "batch[b2]", "batch[b3]"]
SETTINGS = [(False, False), (True, False), (False, True)]  # (trend, robust)
RTOL = 1e-6  # relative, with an absolute floor of 1e-6 x the largest magnitude (see _close)


def _close(ours, ref, *, rtol=RTOL):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.nanmax(np.abs(ref)), equal_nan=True)


def _consortium(kind: str, seed: int = 3) -> dict:
    """Four members of different sizes; member C has no male sample; B did not measure feature 5."""
    rng = np.random.default_rng(seed)
    frames = []
    for member, n in SIZES.items():
        frames.append(
            pd.DataFrame(
                {
                    "member": member,
                    "region": REGION[member],
                    "endpoint": rng.integers(0, 2, n).astype(float) if kind == "binary" else rng.normal(0, 1, n),
                    "age": rng.normal(55, 10, n).round(),
                    "sex": np.array(["F"] * n) if member == "C" else rng.choice(["F", "M"], n),
                    "batch": rng.choice(["b1", "b2", "b3"], n),
                }
            )
        )
    obs = pd.concat(frames, ignore_index=True)
    amean = rng.uniform(2, 10, P)
    # a mean-variance trend (for limma-trend) and three hypervariable features (for robust)
    sd = 0.3 + 1.5 * np.exp(-0.4 * amean) * rng.lognormal(0, 0.3, P)
    sd[[50, 51, 52]] *= 6
    shift = {m: rng.normal(0, 0.5, P) for m in SIZES}
    Y = amean + rng.normal(size=(len(obs), P)) * sd + np.stack([shift[m] for m in obs.member])
    Y[:, :20] += obs.endpoint.to_numpy()[:, None] * rng.normal(0, 1.5, 20)
    Y += 0.01 * (obs.age.to_numpy()[:, None] - 55) + 0.3 * (obs.sex == "M").to_numpy()[:, None]
    measured = {m: np.ones(P, dtype=bool) for m in SIZES}
    measured[UNMEASURED[0]][UNMEASURED[1]] = False
    return {"obs": obs, "Y": Y, "measured": measured, "names": [f"gene{i}" for i in range(P)]}


def _design(obs: pd.DataFrame) -> np.ndarray:
    """Treatment coding, first level the reference, no intercept (what a member builds)."""
    return np.column_stack(
        [
            obs.endpoint,
            obs.age,
            (obs.sex == "M").astype(float),
            (obs.batch == "b2").astype(float),
            (obs.batch == "b3").astype(float),
        ]
    )


def _summed(data: dict, design=_design) -> dict:
    obs, Y = data["obs"], data["Y"]
    pieces = []
    for member in SIZES:
        rows = np.flatnonzero(obs.member == member)
        pieces.append(site_linear_statistics(Y[rows], design(obs.iloc[rows]), measured=data["measured"][member]))
    return {key: np.sum([piece[key] for piece in pieces], axis=0) for key in LINEAR_KEYS}


def _pooled(data: dict, design=_design) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (genes x samples) with NaN where unmeasured, design = intercept + member dummies + columns."""
    obs = data["obs"]
    Y = data["Y"].copy()
    Y[np.ix_(obs.member.to_numpy() == UNMEASURED[0], [UNMEASURED[1]])] = np.nan
    members = pd.get_dummies(obs.member, drop_first=True).astype(float).to_numpy()
    return Y.T, np.column_stack([np.ones(len(obs)), members, design(obs)])


@pytest.fixture(scope="module", params=["binary", "regression"])
def case(request):
    data = _consortium(request.param)
    fit = fit_linear_models(_summed(data), columns=COLUMNS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Partial NA coefficients": B's dummy for the feature B lacks
        reference = pylimma.lm_fit(*_pooled(data))
    return {"data": data, "fit": fit, "reference": reference, "offset": 1 + len(SIZES) - 1}


def test_site_statistics_layout_and_unmeasured_features_are_zero():
    data = _consortium("binary")
    rows = np.flatnonzero(data["obs"].member == "B")
    Y = data["Y"][rows].copy()
    Y[:, UNMEASURED[1]] = np.nan  # anything may sit in an unmeasured column
    pieces = site_linear_statistics(Y, _design(data["obs"].iloc[rows]), measured=data["measured"]["B"])
    assert tuple(pieces) == LINEAR_KEYS
    k = len(COLUMNS)
    assert pieces["xtx"].shape == (P, k * (k + 1) // 2) and pieces["xty"].shape == (P, k)
    assert all(pieces[key].shape == (P,) and pieces[key].dtype == np.float64 for key in LINEAR_KEYS[2:])
    assert all(not np.any(pieces[key][UNMEASURED[1]]) for key in LINEAR_KEYS)
    assert pieces["samples"][0] == len(rows) and pieces["members"][0] == 1.0
    xc = _design(data["obs"].iloc[rows]) - _design(data["obs"].iloc[rows]).mean(axis=0)
    np.testing.assert_allclose(pieces["xtx"][0], (xc.T @ xc)[np.triu_indices(k)])


def test_site_statistics_do_not_depend_on_the_column_block(monkeypatch):
    data = _consortium("binary")
    whole = _summed(data)
    monkeypatch.setattr(lm, "_COLUMN_BLOCK", 7)
    for key, value in _summed(data).items():
        np.testing.assert_allclose(value, whole[key], rtol=1e-12, atol=1e-9)


def test_lmfit_matches_pylimma_on_the_pooled_data_with_a_member_factor(case):
    fit, ref, k0 = case["fit"], case["reference"], case["offset"]
    _close(fit.coefficients, ref["coefficients"][:, k0:], rtol=1e-10)
    _close(fit.stdev_unscaled, ref["stdev_unscaled"][:, k0:], rtol=1e-10)
    _close(fit.sigma, ref["sigma"], rtol=1e-10)
    _close(fit.df_residual, ref["df_residual"], rtol=0)
    _close(fit.amean, ref["Amean"], rtol=1e-12)
    assert fit.df_residual[UNMEASURED[1]] == fit.df_residual[0] - SIZES[UNMEASURED[0]] + 1


@pytest.mark.parametrize(("trend", "robust"), SETTINGS)
def test_ebayes_and_top_table_match_pylimma(case, trend, robust):
    fit, data, k0 = case["fit"], case["data"], case["offset"]
    moderated = ebayes(fit, trend=trend, robust=robust)
    ref = pylimma.e_bayes(dict(case["reference"]), trend=trend, robust=robust, legacy=True)
    _close(moderated.df_prior, ref["df_prior"])
    _close(moderated.s2_prior, ref["s2_prior"])
    _close(moderated.s2_post, ref["s2_post"])
    _close(moderated.df_total, ref["df_total"])
    _close(moderated.t, ref["t"][:, k0:])
    _close(moderated.p_value, ref["p_value"][:, k0:])
    _close(moderated.lods, ref["lods"][:, k0:])
    if robust:  # the hypervariable features are squeezed less
        assert np.ptp(moderated.df_prior) > 0.5 and moderated.df_prior[50:53].max() < np.median(moderated.df_prior)
    ours = top_table(fit, moderated, coef="endpoint", feature_names=data["names"]).set_index("feature")
    theirs = pylimma.top_table(ref, coef=k0, number=np.inf, sort_by="none")
    theirs.index = data["names"]
    theirs = theirs.loc[ours.index]
    assert list(ours.columns) == ["logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B", "members", "samples"]
    for mine, other in [("logFC", "log_fc"), ("AveExpr", "ave_expr"), ("t", "t"), ("P.Value", "p_value")]:
        _close(ours[mine], theirs[other])
    _close(ours["adj.P.Val"], theirs["adj_p_value"])
    _close(ours["B"], theirs["b"])
    assert ours["P.Value"].is_monotonic_increasing and len(ours) == P
    assert ours.loc["gene5", "members"] == 3 and ours.loc["gene5", "samples"] == sum(SIZES.values()) - SIZES["B"]


def test_member_weights_equal_limma_with_array_weights():
    """A member-level weight scales that member's pieces: limma's lmFit with those array weights."""
    data = _consortium("binary")
    weights = {"A": 1.0, "B": 0.5, "C": 2.5, "D": 0.8}
    obs, Y = data["obs"], data["Y"]
    pieces = []
    for member, w in weights.items():
        rows = np.flatnonzero(obs.member == member)
        pieces.append(
            site_linear_statistics(Y[rows], _design(obs.iloc[rows]), measured=data["measured"][member], weight=w)
        )
    fit = fit_linear_models({key: np.sum([p[key] for p in pieces], axis=0) for key in LINEAR_KEYS}, columns=COLUMNS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pylimma.lm_fit(*_pooled(data), weights=obs.member.map(weights).to_numpy())
    k0 = len(SIZES)
    _close(fit.coefficients, ref["coefficients"][:, k0:], rtol=1e-10)
    _close(fit.stdev_unscaled, ref["stdev_unscaled"][:, k0:], rtol=1e-10)
    _close(fit.sigma, ref["sigma"], rtol=1e-10)
    _close(fit.amean, ref["Amean"], rtol=1e-12)  # AveExpr stays unweighted, as in limma
    moderated, reference = ebayes(fit), pylimma.e_bayes(ref, legacy=True)
    _close(moderated.p_value, reference["p_value"][:, k0:])
    # the member's variance factor, from the broadcast fit; A's, with weight 1, is close to 1/weight
    rows = np.flatnonzero(obs.member == "A")
    factor = member_variance_factor(Y[rows], _design(obs.iloc[rows]), fit, measured=data["measured"]["A"])
    assert 0.7 < factor < 1.3
    with pytest.raises(ValueError, match="use the same feature panel and design columns as the fit"):
        member_variance_factor(Y[rows][:, :10], _design(obs.iloc[rows]), fit)
    with pytest.raises(ValueError, match="weight must be a positive finite number"):
        site_linear_statistics(Y[rows], _design(obs.iloc[rows]), weight=0.0)
    unmeasured = np.zeros(P, dtype=bool)
    with pytest.raises(ValueError, match="no feature measured here has a residual variance"):
        member_variance_factor(Y[rows], _design(obs.iloc[rows]), fit, measured=unmeasured)


def _confounded_design(obs: pd.DataFrame) -> np.ndarray:
    """Adds a platform column constant within members (aliased with the member factor) and a batch
    level b4 present only at member B (so not estimable for the feature B did not measure)."""
    b4 = ((obs.member == "B") & (obs.batch == "b3")).astype(float)
    return np.column_stack([_design(obs), (obs.member == "D").astype(float), b4])


def test_non_estimable_columns_follow_lm_pivoting():
    data = _consortium("binary")
    fit = fit_linear_models(_summed(data, _confounded_design), columns=[*COLUMNS, "platform", "batch[b4]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pylimma.lm_fit(*_pooled(data, _confounded_design))
    k0 = len(SIZES)
    _close(fit.coefficients, ref["coefficients"][:, k0:], rtol=1e-9)
    _close(fit.sigma, ref["sigma"], rtol=1e-9)
    _close(fit.df_residual, ref["df_residual"], rtol=0)
    assert np.isnan(fit.coefficients[:, 5]).all() and np.isnan(fit.cov_unscaled[:, 5]).all()
    assert np.isnan(fit.coefficients[UNMEASURED[1], 6]) and np.isfinite(fit.coefficients[0, 6])


def test_column_scale_does_not_matter():
    """Age in seconds (x 3e7) gives the same fit, the age coefficient scaled back."""
    data = _consortium("binary")
    fit = fit_linear_models(_summed(data), columns=COLUMNS)
    scaled = fit_linear_models(_summed(data, lambda obs: _design(obs) * [1, 3e7, 1, 1, 1]), columns=COLUMNS)
    np.testing.assert_allclose(scaled.coefficients * [1, 3e7, 1, 1, 1], fit.coefficients, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scaled.sigma, fit.sigma, rtol=1e-9)


def test_ckks_noise_leaves_the_estimable_columns_and_the_results_alone():
    data = _consortium("binary")
    summed = _summed(data, _confounded_design)
    rng = np.random.default_rng(0)
    # relative noise ~1e-9, and a sum of zeros decrypts to noise, not to zero: ~1e-9 at the CKKS scale,
    # ~1e-5 once the statistics' sum scale (1e4, jobs.sections.SUM_SCALES) is multiplied back
    noisy = {
        key: value * (1 + 1e-9 * rng.standard_normal(value.shape)) + 1e-5 * rng.standard_normal(value.shape)
        for key, value in summed.items()
    }
    columns = [*COLUMNS, "platform", "batch[b4]"]
    exact, fit = fit_linear_models(summed, columns=columns), fit_linear_models(noisy, columns=columns)
    np.testing.assert_array_equal(np.isnan(fit.coefficients), np.isnan(exact.coefficients))
    np.testing.assert_array_equal(fit.df_residual, exact.df_residual)
    np.testing.assert_allclose(fit.sigma, exact.sigma, rtol=1e-5)  # the noise, propagated
    # the noise moves the coefficients by less than 1e-3 of their standard errors
    se = exact.stdev_unscaled * exact.sigma[:, None]
    assert np.nanmax(np.abs(fit.coefficients - exact.coefficients) / se) < 1e-3


def _region_design(obs: pd.DataFrame) -> np.ndarray:
    """endpoint, age and endpoint-by-region interactions (EU the reference region)."""
    e = obs.endpoint.to_numpy()
    return np.column_stack([e, obs.age, e * (obs.region == "APAC"), e * (obs.region == "US")])


REGION_COLUMNS = ["endpoint", "age", "endpoint:region[APAC]", "endpoint:region[US]"]


def test_f_test_equals_statsmodels_ols_with_the_member_factor():
    data = _consortium("binary")
    fit = fit_linear_models(_summed(data, _region_design), columns=REGION_COLUMNS)
    F, p, df1, df2 = f_test(fit, coefs=["endpoint:region[APAC]", "endpoint:region[US]"])
    frame = data["obs"].assign(apac=_region_design(data["obs"])[:, 2], us=_region_design(data["obs"])[:, 3])
    for g in [0, 1, 7, 30, UNMEASURED[1]]:
        rows = ~((frame.member == UNMEASURED[0]) & (g == UNMEASURED[1])).to_numpy()
        ols = smf.ols("y ~ endpoint + age + apac + us + C(member)", data=frame[rows].assign(y=data["Y"][rows, g])).fit()
        reference = ols.f_test("apac = 0, us = 0")
        np.testing.assert_allclose(F[g], float(np.squeeze(reference.fvalue)), rtol=1e-8)
        np.testing.assert_allclose(p[g], float(reference.pvalue), rtol=1e-8)
        assert (df1[g], df2[g]) == (reference.df_num, reference.df_denom)


def test_contrast_effects_match_pylimma_contrasts_fit():
    data = _consortium("binary")
    fit = fit_linear_models(_summed(data, _region_design), columns=REGION_COLUMNS)
    moderated = ebayes(fit)
    estimate, se, t, p = contrast_effects(fit, moderated, weights={"endpoint": 1.0, "endpoint:region[APAC]": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pylimma.lm_fit(*_pooled(data, _region_design))
    contrast = np.zeros((ref["coefficients"].shape[1], 1))
    contrast[[len(SIZES), len(SIZES) + 2], 0] = 1.0  # endpoint + endpoint:region[APAC]: the APAC effect
    ref = pylimma.e_bayes(pylimma.contrasts_fit(ref, contrasts=contrast), legacy=True)
    # limma's contrasts.fit takes the correlation of the coefficients from the whole design, which is
    # approximate for a feature with missing values (limma's documentation says so): compare the
    # feature B did not measure with the OLS algebra instead
    full = np.arange(P) != UNMEASURED[1]
    _close(estimate[full], ref["coefficients"][full, 0])
    _close(t[full], ref["t"][full, 0])
    _close(p[full], ref["p_value"][full, 0])
    _close(se[full], ref["stdev_unscaled"][full, 0] * np.sqrt(ref["s2_post"][full]))
    g = UNMEASURED[1]
    frame = data["obs"].assign(apac=_region_design(data["obs"])[:, 2], us=_region_design(data["obs"])[:, 3])
    rows = (frame.member != UNMEASURED[0]).to_numpy()
    ols = smf.ols("y ~ endpoint + age + apac + us + C(member)", data=frame[rows].assign(y=data["Y"][rows, g])).fit()
    algebra = ols.t_test("endpoint + apac = 0")
    np.testing.assert_allclose(estimate[g], float(np.squeeze(algebra.effect)), rtol=1e-10)
    np.testing.assert_allclose(se[g] / np.sqrt(moderated.s2_post[g]), float(np.squeeze(algebra.sd)) / fit.sigma[g])
    np.testing.assert_allclose(t[g], estimate[g] / se[g])
    same = contrast_effects(fit, moderated, weights=np.array([1.0, 0, 1.0, 0]))
    np.testing.assert_array_equal(same[0], estimate)


def test_cochran_q_and_i2():
    Q, p, I2 = cochran_q(np.array([[1.0, 2.0, 3.0], [0.0, 4.0, np.nan]]), np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(Q, [2.0, 8.0])
    np.testing.assert_allclose(p, [np.exp(-1.0), 0.004677734981047266])  # chi2(2) and chi2(1) tails
    np.testing.assert_allclose(I2, [0.0, 7.0 / 8.0])
    Q, p, I2 = cochran_q(np.array([[1.0, np.nan]]), np.array([[1.0, 1.0]]))
    assert np.isnan(Q).all() and np.isnan(p).all() and np.isnan(I2).all()


def test_ebayes_primitives_handle_their_edge_cases():
    np.testing.assert_allclose(trigamma_inverse(np.array([1e8, 1e-7, 2.0]))[:2], [1e-4, 1e7])
    from scipy.special import polygamma

    np.testing.assert_allclose(polygamma(1, trigamma_inverse(np.array([0.1, 2.0, 50.0]))), [0.1, 2.0, 50.0])
    # identical variances: no spread beyond chi-square sampling -> infinite prior df
    flat = fit_f_dist(np.full(50, 2.0), np.full(50, 4.0))
    assert np.isinf(flat.df) and flat.scale == 2.0
    # a one-valued covariate falls back to no trend
    assert np.isfinite(fit_f_dist(np.linspace(1, 2, 20), np.full(20, 4.0), covariate=np.ones(20)).scale).all()
    basis = natural_spline_basis(np.linspace(0, 1, 11), df=4)
    np.testing.assert_allclose(np.linalg.matrix_rank(basis), 4)
    # outside the knots the basis continues linearly
    outside = natural_spline_basis(np.array([2.0, 3.0, 4.0]), df=4, knots_from=np.linspace(0, 1, 11))
    np.testing.assert_allclose(outside[2] - outside[1], outside[1] - outside[0], atol=1e-12)
    robust = fit_f_dist_robustly(np.array([1.0, 2.0]), np.array([3.0, 3.0]))
    assert robust.df.shape == (2,)
    with pytest.raises(ValueError, match="robust=True with trend=True"):
        squeeze_var(np.ones(5), np.ones(5), covariate=np.arange(5.0), robust=True)
    with pytest.raises(ValueError, match="could not estimate the prior df from 0 usable"):
        squeeze_var(np.full(3, np.nan), np.ones(3))
    with pytest.raises(ValueError, match="more than half are <= 0"):
        fit_f_dist_robustly(np.array([0.0, 0.0, 0.0, 1.0]), np.full(4, 3.0))


def test_features_without_residual_df_are_left_out():
    Y = np.random.default_rng(1).normal(size=(4, 3))
    pieces = site_linear_statistics(Y, np.array([[0.0], [1.0], [0.0], [1.0]]), measured=np.array([True, True, False]))
    fit = fit_linear_models(pieces, columns=["endpoint"])
    assert np.isnan(fit.sigma[2]) and np.isnan(fit.amean[2]) and fit.df_residual[2] == 0
    tiny = site_linear_statistics(Y[:2], np.array([[0.0], [1.0]]))  # n = members + rank: no residual df
    assert np.isnan(fit_linear_models(tiny, columns=["endpoint"]).sigma).all()
    with pytest.raises(ValueError, match="eBayes needs at least two"):
        ebayes(fit_linear_models(tiny, columns=["endpoint"]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: site_linear_statistics(np.ones(3), np.ones((3, 1))), "Y must be 2-D"),
        (lambda: site_linear_statistics(np.ones((3, 2)), np.ones((2, 1))), "design must be 2-D with one row per row"),
        (lambda: site_linear_statistics(np.ones((3, 2)), np.full((3, 1), np.nan)), "design holds non-finite"),
        (
            lambda: site_linear_statistics(np.ones((3, 2)), np.ones((3, 1)), measured=np.ones(2)),
            "measured must be a bool",
        ),
        (lambda: site_linear_statistics(np.full((3, 2), np.nan), np.ones((3, 1))), "Y: 2 measured feature"),
    ],
)
def test_site_statistics_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fit_ebayes_and_tests_reject_bad_input():
    data = _consortium("binary")
    summed = _summed(data)
    with pytest.raises(ValueError, match="columns must name the design columns uniquely"):
        fit_linear_models(summed, columns=["endpoint", "endpoint", "a", "b", "c"])
    with pytest.raises(ValueError, match=r"summed lacks \['yty'\]"):
        fit_linear_models({k: v for k, v in summed.items() if k != "yty"}, columns=COLUMNS)
    with pytest.raises(ValueError, match=r"summed\['xtx'\] has shape \(200, 15\), expected \(200, 10\)"):
        fit_linear_models(summed, columns=COLUMNS[:4])
    fit = fit_linear_models(summed, columns=COLUMNS)
    with pytest.raises(ValueError, match="proportion must lie in"):
        ebayes(fit, proportion=1.5)
    with pytest.raises(ValueError, match="stdev_coef_lim must be two positive"):
        ebayes(fit, stdev_coef_lim=(4.0, 0.1))
    with pytest.raises(ValueError, match="robust=True with trend=True"):
        ebayes(fit, trend=True, robust=True)
    moderated = ebayes(fit)
    with pytest.raises(ValueError, match="coef: 'response' is not a design column"):
        top_table(fit, moderated, coef="response", feature_names=data["names"])
    with pytest.raises(ValueError, match="feature_names has 3 names"):
        top_table(fit, moderated, feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="weights must have shape"):
        contrast_effects(fit, moderated, weights=np.ones(2))
    with pytest.raises(ValueError, match="weights must be finite and not all zero"):
        contrast_effects(fit, moderated, weights={"endpoint": 0.0})
    with pytest.raises(ValueError, match="weights: 'x' is not a design column"):
        contrast_effects(fit, moderated, weights={"x": 1.0})
    with pytest.raises(ValueError, match="coefs must name one or more distinct"):
        f_test(fit, coefs=[])
    with pytest.raises(ValueError, match="coefs: 'region' is not a design column"):
        f_test(fit, coefs=["region"])
    with pytest.raises(ValueError, match="effects and se must be 2-D of the same shape"):
        cochran_q(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="se holds zero or negative"):
        cochran_q(np.ones((2, 2)), np.zeros((2, 2)))


_R_SCRIPT = textwrap.dedent(
    """
    suppressMessages(library(limma))
    args <- commandArgs(trailingOnly = TRUE)
    y <- as.matrix(read.csv(file.path(args[1], "y.csv"), header = FALSE))
    x <- as.matrix(read.csv(file.path(args[1], "x.csv"), header = FALSE))
    fit <- lmFit(y, x)
    out <- list()
    settings <- list(c(FALSE, FALSE), c(TRUE, FALSE))
    # robust eBayes needs statmod's Gauss quadrature
    if (requireNamespace("statmod", quietly = TRUE)) settings[[3]] <- c(FALSE, TRUE)
    for (s in settings) {
      eb <- suppressWarnings(eBayes(fit, trend = s[1], robust = s[2]))
      j <- ncol(x) - %d
      tt <- topTable(eb, coef = j, number = Inf, sort.by = "none")
      out[[length(out) + 1]] <- data.frame(trend = s[1], robust = s[2], logFC = tt$logFC, AveExpr = tt$AveExpr,
        t = tt$t, P.Value = tt$P.Value, adj.P.Val = tt$adj.P.Val, B = tt$B, df_total = eb$df.total,
        df_prior = rep_len(eb$df.prior, nrow(y)), s2_prior = rep_len(eb$s2.prior, nrow(y)))
    }
    write.csv(do.call(rbind, out), file.path(args[1], "out.csv"), row.names = FALSE)
    """
)


def _r_limma_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    return subprocess.run(["Rscript", "-e", "library(limma)"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _r_limma_available(), reason="Rscript or the limma R package is not installed")
def test_matches_r_limma(tmp_path, case):
    """R limma <= 3.60 always uses these estimators; later versions switch to fitFDistUnequalDF1 when
    the residual df differ between features (here: the feature member B did not measure)."""
    Y, X = _pooled(case["data"])
    np.savetxt(tmp_path / "y.csv", Y, delimiter=",")
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    (tmp_path / "run.R").write_text(_R_SCRIPT % (len(COLUMNS) - 1))
    subprocess.run(["Rscript", str(tmp_path / "run.R"), str(tmp_path)], check=True, capture_output=True, timeout=120)
    out = pd.read_csv(tmp_path / "out.csv")
    fit = case["fit"]
    for trend, robust in SETTINGS:
        r = out[(out.trend == trend) & (out.robust == robust)].reset_index(drop=True)
        if r.empty:  # robust without R's statmod package
            continue
        moderated = ebayes(fit, trend=trend, robust=robust)
        ours = top_table(fit, moderated, feature_names=case["data"]["names"])
        ours = ours.set_index("feature").loc[case["data"]["names"]].reset_index()
        for column in ["logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B"]:
            _close(ours[column], r[column])
        _close(moderated.df_total, r.df_total)
        _close(np.broadcast_to(moderated.df_prior, (P,)), r.df_prior)
        _close(np.broadcast_to(moderated.s2_prior, (P,)), r.s2_prior)
