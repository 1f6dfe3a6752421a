"""The Poisson-gamma enrollment model: time to target against its closed form and a seeded simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from models.enrollment import (
    enrolled_cdf,
    enrollment_curve,
    enrollment_forecast,
    enrollment_scenarios,
    site_rates,
    time_to_target_cdf,
)


def test_equal_sites_match_the_closed_form_beta_prime_quantiles():
    """M sites of mean rate mu and shape a: Lambda ~ Gamma(M a, rate a / mu), so T_n = (a / mu) X / Y with
    X ~ Gamma(n), Y ~ Gamma(M a): a beta-prime variable scaled by a / mu."""
    sites, mu, cv, target = 4, 2.0, 0.5, 60
    shape = 1 / cv**2
    forecast = enrollment_forecast([mu] * sites, target=target, rate_cv=cv, interval=0.9)
    reference = stats.betaprime(target, sites * shape, scale=shape / mu)
    assert forecast.median == pytest.approx(reference.median(), rel=1e-6)
    assert (forecast.low, forecast.high) == pytest.approx(tuple(reference.ppf([0.05, 0.95])), rel=1e-6)
    assert forecast.rate == 8.0 and forecast.target == 60 and forecast.interval == 0.9


def test_known_rates_match_the_erlang_closed_form():
    forecast = enrollment_forecast([1.5, 2.5], target=30, rate_cv=0.0)
    assert forecast.median == pytest.approx(stats.gamma(30, scale=1 / 4.0).median(), rel=1e-6)


def test_unequal_sites_match_a_seeded_simulation_within_two_percent():
    rates, cv, target = [3.0, 1.0, 0.5, 0.2], 0.7, 40
    forecast = enrollment_forecast(rates, target=target, rate_cv=cv)
    rng = np.random.default_rng(11)
    shape = 1 / cv**2
    site = stats.gamma.rvs(a=shape, scale=np.array(rates) / shape, size=(40_000, len(rates)), random_state=rng)
    months = stats.gamma.rvs(a=target, scale=1 / site.sum(axis=1), random_state=rng)
    simulated = np.quantile(months, [0.05, 0.5, 0.95])
    assert forecast.median == pytest.approx(simulated[1], rel=0.02)
    assert (forecast.low, forecast.high) == pytest.approx((simulated[0], simulated[2]), rel=0.05)
    assert time_to_target_cdf(forecast.median, rates, target=target, rate_cv=cv) == pytest.approx(0.5, abs=1e-6)


def test_relaxing_a_criterion_shortens_the_time_and_rates_come_from_capacity_fraction_and_consent():
    capacity = {"a": 40.0, "b": 10.0, "c": 0.0}
    assert site_rates(capacity, {"a": 0.25, "b": 0.5, "c": 0.9}, consent_rate=0.5) == {"a": 5.0, "b": 2.5, "c": 0.0}
    forecasts = enrollment_scenarios(
        capacity,
        {"protocol": 0.1, "without renal": 0.2, "without fit": 0.1, "without adult": None},
        consent_rate=0.6,
        target=50,
        rate_cv=0.5,
    )
    by_scenario = {f.scenario: f for f in forecasts}
    assert [f.scenario for f in forecasts] == ["protocol", "without renal", "without fit"]  # None: withheld
    assert by_scenario["protocol"].rate == pytest.approx(3.0)
    assert by_scenario["without renal"].median < by_scenario["protocol"].median
    assert by_scenario["without fit"].median == by_scenario["protocol"].median
    assert all(f.low < f.median < f.high for f in forecasts)


def test_no_enrolling_site_never_reaches_the_target_and_bad_input_is_refused():
    assert math.isinf(enrollment_forecast([0.0, 0.0], target=5, rate_cv=0.5).median)
    with pytest.raises(ValueError, match="consent_rate = 0"):
        site_rates({"a": 1.0}, 0.5, consent_rate=0)
    with pytest.raises(ValueError, match="eligible fraction 1.5"):
        site_rates({"a": 1.0}, 1.5, consent_rate=1.0)
    with pytest.raises(ValueError, match="target = 0"):
        enrollment_forecast([1.0], target=0, rate_cv=0.5)


def test_the_enrollment_curve_brackets_the_mean():
    rates = [2.0, 1.0]
    curve = enrollment_curve(rates, [0.0, 6.0, 12.0], rate_cv=0.5)
    assert curve.shape == (3, 3) and curve[0].tolist() == [0, 0, 0]
    assert curve[1, 0] < 18 < curve[1, 2] and curve[2, 0] < 36 < curve[2, 2]
    assert enrolled_cdf(6.0, rates, count=int(curve[1, 1]), rate_cv=0.5) >= 0.5
