"""Calibration of the federated limma pipeline on null features (no true effect).

Each case simulates 20,000 null features, runs site pieces per member -> sum -> fit -> eBayes and
checks that the share of ``endpoint`` p-values below 0.05 lies in [0.04, 0.06] and below 0.001 in
[0.0003, 0.002]. Seeds are fixed (``SEED + case``), chosen before any result was seen.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from omics.design import DesignSpec
from omics.ebayes import ebayes
from omics.linear_model import (
    LINEAR_KEYS,
    fit_linear_models,
    member_variance_factor,
    site_linear_statistics,
)
from omics.statistics import EndpointDesign, endpoint_statistics, site_statistics

SEED = 2024
FEATURES = 20_000


def _pvalues(members, *, weights=None, trend=False) -> np.ndarray:
    """``members``: list of ``(Y, endpoint)``; the endpoint is the only design column."""
    weights = np.ones(len(members)) if weights is None else weights
    pieces = [site_linear_statistics(Y, x[:, None], weight=w) for (Y, x), w in zip(members, weights, strict=True)]
    summed = {key: np.sum([piece[key] for piece in pieces], axis=0) for key in LINEAR_KEYS}
    fit = fit_linear_models(summed, columns=["endpoint"])
    p = ebayes(fit, trend=trend).p_value[:, 0]
    return p[np.isfinite(p)], fit


def _assert_calibrated(p: np.ndarray) -> None:
    assert p.size >= 4000
    low, tiny = float(np.mean(p < 0.05)), float(np.mean(p < 0.001))
    assert 0.04 <= low <= 0.06 and 0.0003 <= tiny <= 0.002, f"share p<0.05 {low:.4f}, p<0.001 {tiny:.5f}"


def _five_versus_fifty() -> np.ndarray:
    return np.r_[np.ones(5), np.zeros(50)]


def test_one_member_gaussian_five_positives():
    rng = np.random.default_rng(SEED + 1)
    Y = rng.normal(rng.uniform(0, 10, FEATURES), rng.lognormal(0, 0.5, FEATURES), size=(55, FEATURES))
    _assert_calibrated(_pvalues([(Y, _five_versus_fifty())])[0])


def test_one_member_skewed_log_counts_five_positives():
    """log1p of negative-binomial counts (means from 0.4 to ~1,000, dispersion 0.3): skewed values."""
    rng = np.random.default_rng(SEED + 2)
    mean = rng.lognormal(np.log(20), 1.2, FEATURES)
    counts = rng.poisson(rng.gamma(1 / 0.3, mean * 0.3, size=(55, FEATURES)))
    _assert_calibrated(_pvalues([(np.log1p(counts), _five_versus_fifty())])[0])


def _sparse_members(rng, *, positives: int) -> list:
    """Three members (40, 50, 60 cells; ``positives`` each) of log1p(CP10k) of NB counts: ~3,000 counts a
    cell, relative abundances over two orders of magnitude, dispersion 0.5; about 90% zeros."""
    members = []
    for n in (40, 50, 60):
        library = rng.lognormal(np.log(3000), 0.5, n)
        abundance = rng.lognormal(np.log(1 / FEATURES), 1.5, FEATURES)
        abundance /= abundance.sum()
        counts = rng.poisson(rng.gamma(1 / 0.5, library[:, None] * abundance * 0.5))
        endpoint = np.zeros(n)
        endpoint[:positives] = 1.0
        members.append((np.log1p(counts / library[:, None] * 1e4), endpoint))
    return members


def _pipeline_pvalues(members, *, trend: bool) -> tuple[np.ndarray, dict]:
    """The platform's own route for count data: each member's pieces with its detection counts
    (:func:`omics.statistics.site_statistics` with ``detection``), summed, then the released table."""
    design = EndpointDesign(spec=DesignSpec("~ endpoint"), min_cell=5, detection=True)
    pieces = [
        site_statistics(Y, x, pd.DataFrame(index=range(len(x))), kind="binary", design=design) for Y, x in members
    ]
    summed = {key: np.sum([piece[key] for piece in pieces], axis=0) for key in pieces[0]}
    released = endpoint_statistics(
        summed, kind="binary", spec=design.spec, feature_names=[f"g{j}" for j in range(FEATURES)], trend=trend
    )
    p = released.table["P.Value"].to_numpy()
    return p[np.isfinite(p)], released.design


@pytest.mark.parametrize("trend", [False, True], ids=["limma", "limma-trend"])
def test_three_members_sparse_counts_six_positives_each(trend):
    """Measured at this seed: limma 0.0497 / 0.00150, limma-trend 0.0483 / 0.00163; 7,351 of 20,000
    features tested. Without the low-detection filter the p<0.001 share is 0.0027 (0.0022-0.0038 over 4
    seeds): one positive cell with a non-zero value makes the difference in means heavy-tailed, which no
    variance moderation fixes; edgeR's filterByExpr rule (a feature must be detected in at least as many
    samples as the smaller class holds, here 18) leaves out exactly those features (0.0011-0.0017 over 4
    seeds). Two positives per member is not a case the platform tests: every member is then below the
    small-cell rule (``test_statistics``) and sends nothing."""
    members = _sparse_members(np.random.default_rng(SEED + 3), positives=6)
    assert np.mean([np.mean(Y == 0) for Y, _ in members]) > 0.8
    logging.getLogger("omics.ebayes").setLevel(logging.ERROR)  # zero variances are expected here
    p, design = _pipeline_pvalues(members, trend=trend)
    assert design["filtered"]["features"] == FEATURES - p.size
    _assert_calibrated(p)


def test_sparse_counts_without_the_low_detection_filter_are_anticonservative():
    """The filter is what calibrates the sparse case: the same data without it fall outside the bounds."""
    members = _sparse_members(np.random.default_rng(SEED + 3), positives=6)
    logging.getLogger("omics.ebayes").setLevel(logging.ERROR)
    tiny = float(np.mean(_pvalues(members)[0] < 0.001))
    assert tiny > 0.002, tiny


def _tiny_members(rng) -> list:
    """A regression endpoint at members of 8, 10, 12 and 100 samples; every feature has its own SD,
    shared by the members, except that the 12-sample member's platform is 3x noisier for all features."""
    sd = rng.lognormal(0, 0.5, FEATURES)
    members = []
    for n, scale in [(8, 1.0), (10, 1.0), (12, 3.0), (100, 1.0)]:
        Y = rng.normal(rng.uniform(0, 10, FEATURES), scale * sd, size=(n, FEATURES))
        members.append((Y, rng.normal(0, 1, n)))
    return members


@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured at this seed: p<0.05 share 0.0238, p<0.001 0.00005 (trend and robust the same). Least "
        "squares pools the variance over members: the noisy member's share of the slope (its endpoint "
        "spread) and its share of the residual df differ by chance, so the SE is mis-scaled; over 8 seeds "
        "the p<0.05 share ranged 0.024-0.078. limma's remedy is array weights by member (next test)."
    ),
)
def test_tiny_members_with_a_noisy_platform_plain_limma():
    _assert_calibrated(_pvalues(_tiny_members(np.random.default_rng(SEED + 4)))[0])


def test_tiny_members_with_a_noisy_platform_member_weights():
    """Member-level precision weights (limma's arrayWeights(var.group=member), federated: each member
    estimates its variance factor from the broadcast fit and scales its own pieces)."""
    members = _tiny_members(np.random.default_rng(SEED + 4))
    weights = np.ones(len(members))
    for _ in range(3):
        _, fit = _pvalues(members, weights=weights)
        factors = [
            member_variance_factor(Y, x[:, None], fit, weight=w) for (Y, x), w in zip(members, weights, strict=True)
        ]
        weights = 1.0 / np.array(factors)
    np.testing.assert_allclose(weights / weights[-1], [1.0, 1.0, 1 / 9, 1.0], rtol=0.05)
    _assert_calibrated(_pvalues(members, weights=weights)[0])
