"""Time to reach a target enrollment under the Poisson-gamma model (Anisimov & Fedorov, 2007).

Each member site enrolls as a Poisson process whose rate is uncertain: ``lambda_i ~ Gamma(shape a,
mean mu_i)``, with ``mu_i = screening capacity x eligible fraction x consent rate`` (patients a month)
and ``a = 1 / rate_cv**2`` (``rate_cv``: the coefficient of variation of a site's rate; 0 is a known
rate). Given the rates, the count by month ``t`` is Poisson; over the gamma rates a site's count is
negative binomial, ``NB(a, a / (a + mu_i t))``, and the consortium's count ``N(t)`` is their sum, so

    P(T_n <= t) = P(N(t) >= n) = 1 - sum_{k < n} (pmf_1 * ... * pmf_M)(k)

computed exactly from scipy's ``nbinom`` pmfs; the median and the interval of ``T_n`` are its
quantiles (``brentq``). When every site has the same mean, ``T_n`` is a scaled beta-prime variable
(``mu`` summed rates and ``M a`` summed shapes), a closed form the tests check against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnrollmentForecast:
    """Months to reach ``target`` patients: the median and the ``interval`` (e.g. 0.9) interval."""

    scenario: str
    target: int
    rate: float  # expected patients a month, all sites together
    median: float
    low: float
    high: float
    interval: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def site_rates(
    capacity: Mapping[str, float], eligible_fraction: Mapping[str, float] | float, *, consent_rate: float
) -> dict[str, float]:
    """Expected enrolled patients a month per site: screened a month x eligible fraction x consent rate.

    ``eligible_fraction`` is one number for every site (from the released total) or one per site.
    """
    if not 0.0 < consent_rate <= 1.0:
        raise ValueError(f"consent_rate = {consent_rate}: give a share in (0, 1]")
    rates = {}
    for site, screened in capacity.items():
        fraction = eligible_fraction if isinstance(eligible_fraction, int | float) else eligible_fraction[site]
        if screened < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"site {site!r}: capacity {screened} must be >= 0 and eligible fraction {fraction} in [0, 1]"
            )
        rates[site] = float(screened) * float(fraction) * consent_rate
    return rates


def enrolled_pmf(months: float, rates: Sequence[float], *, upto: int, rate_cv: float) -> np.ndarray:
    """P(N(months) = k) for k = 0..upto: the sum of the sites' negative binomial counts (Poisson when
    ``rate_cv`` is 0)."""
    rates = np.asarray([r for r in rates if r > 0], dtype=float)
    support = np.arange(upto + 1)
    if months <= 0 or rates.size == 0:
        return (support == 0).astype(float)
    if rate_cv == 0:
        return stats.poisson.pmf(support, rates.sum() * months)
    shape = 1.0 / rate_cv**2
    total = (support == 0).astype(float)
    for rate in rates:
        pmf = stats.nbinom.pmf(support, shape, shape / (shape + rate * months))
        total = np.convolve(total, pmf)[: upto + 1]
    return total


def enrolled_cdf(months: float, rates: Sequence[float], *, count: int, rate_cv: float) -> float:
    """P(N(months) <= count): the chance that at most ``count`` patients are enrolled by ``months``."""
    return float(min(1.0, enrolled_pmf(months, rates, upto=count, rate_cv=rate_cv).sum()))


def time_to_target_cdf(months: float, rates: Sequence[float], *, target: int, rate_cv: float) -> float:
    """P(T_target <= months) = P(N(months) >= target)."""
    return 1.0 - enrolled_cdf(months, rates, count=target - 1, rate_cv=rate_cv)


def time_to_target_quantile(q: float, rates: Sequence[float], *, target: int, rate_cv: float) -> float:
    """The ``q`` quantile of the months to reach ``target`` (``inf`` when no site enrolls)."""
    total = sum(r for r in rates if r > 0)
    if total == 0:
        return math.inf
    high = target / total
    while time_to_target_cdf(high, rates, target=target, rate_cv=rate_cv) < q:
        high *= 2.0
        if high > 1e7:
            return math.inf
    return float(
        optimize.brentq(
            lambda t: time_to_target_cdf(t, rates, target=target, rate_cv=rate_cv) - q, 0.0, high, xtol=1e-6, rtol=1e-9
        )
    )


def enrollment_forecast(
    rates: Sequence[float], *, target: int, rate_cv: float, interval: float = 0.9, scenario: str = "protocol"
) -> EnrollmentForecast:
    """Median months to ``target`` enrolled patients and its central ``interval``."""
    if target < 1:
        raise ValueError(f"target = {target}: give the number of patients to enroll (1 or more)")
    if rate_cv < 0 or not 0 < interval < 1:
        raise ValueError(f"rate_cv = {rate_cv} must be >= 0 and interval = {interval} in (0, 1)")
    tail = (1.0 - interval) / 2.0
    low, median, high = (
        time_to_target_quantile(q, rates, target=target, rate_cv=rate_cv) for q in (tail, 0.5, 1.0 - tail)
    )
    return EnrollmentForecast(scenario, target, float(sum(rates)), median, low, high, interval)


def enrollment_scenarios(
    capacity: Mapping[str, float],
    eligible_fractions: Mapping[str, Mapping[str, float] | float | None],
    *,
    consent_rate: float,
    target: int,
    rate_cv: float,
    interval: float = 0.9,
) -> list[EnrollmentForecast]:
    """One forecast per scenario (``protocol``, then ``without <criterion>`` for each relaxation), each from
    the scenario's eligible fraction (one number, or one per site) and the sites' screening capacity.
    A scenario whose fraction is ``None`` (it rests on a withheld count) gets no forecast."""
    forecasts = []
    for scenario, fraction in eligible_fractions.items():
        if fraction is None:
            log.info("enrollment %s: not forecast, its eligible count is withheld (small cell)", scenario)
            continue
        rates = site_rates(capacity, fraction, consent_rate=consent_rate)
        forecasts.append(
            enrollment_forecast(
                list(rates.values()), target=target, rate_cv=rate_cv, interval=interval, scenario=scenario
            )
        )
        log.info("enrollment %s: median %.1f months to %d patients", scenario, forecasts[-1].median, target)
    return forecasts


def enrollment_curve(
    rates: Sequence[float], months: Sequence[float], *, rate_cv: float, quantiles: Sequence[float] = (0.05, 0.5, 0.95)
) -> np.ndarray:
    """Quantiles of the patients enrolled by each month (rows: months; columns: ``quantiles``), for a plot."""
    curve = np.zeros((len(months), len(quantiles)))
    for row, t in enumerate(months):
        mean = sum(rates) * t
        count = int(mean + 10 * math.sqrt(mean * (1 + mean * rate_cv**2)) + 10)
        cdf = np.cumsum(enrolled_pmf(t, rates, upto=count, rate_cv=rate_cv))
        curve[row] = [int(np.searchsorted(cdf, q)) for q in quantiles]
    return curve
