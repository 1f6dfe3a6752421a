"""Calibration of the pseudobulk route for single-cell members on null genes (no true effect).

The cells of ``test_calibration_linear.py``'s sparse case (about 90% zeros, ~3,000 counts a cell,
negative-binomial dispersion 0.5), now grouped into donors: three members of 8, 10 and 12 donors, 2
positive donors each (6 of 30), donors differing biologically (a gamma factor per gene and donor). Each
member's cells (sparse CSR) are summed per donor (:func:`omics.pseudobulk.pseudobulk`), normalized
(:func:`omics.normalize.normalize`: library size + log1p, ``layers['log']``), and the donors' log
values go through site pieces per member -> sum -> fit -> eBayes with the donor label ``endpoint`` as the
only design column. Checked as there: the share of p < 0.05 in [0.04, 0.06] and of p < 0.001 in
[0.0003, 0.002], over 20,000 null genes. The seed is fixed (``SEED``, the same for every case), chosen
before any result was seen.

Genes without a count in any donor of a member (~900 gene-member pairs here) are marked unmeasured there
(``measured=False``): label-blind, and the member then adds neither samples nor residual df for that
gene instead of a column of zeros. No expression filter: it is not needed (low-count genes are
calibrated where donors have equal depth, below), and it would leave ~4,000 genes, on which the p < 0.001
share rests on ~4 expected hits. Tried outside the tests: an edgeR filterByExpr-like filter (count-per-
million >= 10 / median library in >= 70% of a member's donors, label-blind) kept 3,600-4,200 genes and
changed no conclusion (p < 0.05 share 0.043-0.060 over the 8 seeds below, the same depth dependence);
not marking the all-zero genes moved the shares by < 0.001.

What decides calibration here is the donors' depth. A donor's technical variance on the log scale (the
counting noise and the cell-to-cell overdispersion, ~1/counts + 0.5/cells) falls with its cells and
counts; plain limma pools one variance over donors, so when the positive donors are shallower than the
negatives the standard error of their difference is too small for every gene at once. Measured over
seeds 2024-2031 (limma; limma-trend within ~0.003):

- equal depth (55 cells a donor, no donor library factor): p<0.05 0.0457-0.0489, p<0.001 0.0011-0.0015;
- 30-80 cells a donor, depth unrelated to the label: p<0.05 0.038-0.064, p<0.001 0.00065-0.0021,
  outside the bounds at 2 of 8 seeds; the share rises as the positives' depth falls relative to the
  negatives' (seed 2025: positives at 0.76x the negatives' library, 0.064; seed 2027: 1.23x, 0.038);
- positives with fewer cells (30-45 against 45-80): p<0.05 0.061-0.085 at all 8 seeds.

limma's remedy is precision weights per donor (voom, or voomWithQualityWeights); the federated pipeline
has member-level weights only.
"""

from __future__ import annotations

import functools
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from omics.ebayes import ebayes
from omics.linear_model import LINEAR_KEYS, fit_linear_models, site_linear_statistics
from omics.normalize import normalize
from omics.pseudobulk import pseudobulk

SEED = 2024
GENES = 20_000
DONORS = (8, 10, 12)  # per member; the first 2 donors of each are positive: 6 of 30
POSITIVES_PER_MEMBER = 2
TREND = pytest.mark.parametrize("trend", [False, True], ids=["limma", "limma-trend"])


def _cells_any(rng, positive: bool) -> int:
    return int(rng.integers(30, 81))


def _cells_equal(rng, positive: bool) -> int:
    return 55


def _cells_fewer_in_positives(rng, positive: bool) -> int:
    return int(rng.integers(30, 46) if positive else rng.integers(45, 81))


CASES = {  # cells per donor, sd of the donor's log library factor
    "any depth": (_cells_any, 0.2),
    "equal depth": (_cells_equal, 0.0),
    "shallower positives": (_cells_fewer_in_positives, 0.2),
}


def _members(rng, cells_per_donor=_cells_any, donor_depth_sd: float = 0.2) -> list[ad.AnnData]:
    """Three members of cells x genes (sparse CSR counts), simulated one donor at a time.

    Genes: relative abundances lognormal over two orders of magnitude, shared by the members. Donors: a
    gamma factor per gene (mean 1, variance the gene's squared biological CV, lognormal around 0.1: a
    BCV of ~0.3, as between human donors) and a library factor (lognormal, sd ``donor_depth_sd``).
    Cells: ``cells_per_donor`` cells of ~3,000 counts (lognormal, sd 0.5) of negative-binomial counts
    (dispersion 0.5) around the donor's means. The endpoint is the donor's 0/1 label, in ``obs``.
    """
    abundance = rng.lognormal(np.log(1 / GENES), 1.5, GENES)
    abundance /= abundance.sum()
    bcv2 = rng.lognormal(np.log(0.1), 0.5, GENES)
    var = pd.DataFrame(index=[f"g{i}" for i in range(GENES)])
    members = []
    for member, n_donors in enumerate(DONORS):
        blocks, donors, labels = [], [], []
        for donor in range(n_donors):
            positive = donor < POSITIVES_PER_MEMBER
            n_cells = cells_per_donor(rng, positive)
            means = abundance * rng.gamma(1 / bcv2, bcv2)
            library = rng.lognormal(np.log(3000), 0.5, n_cells) * rng.lognormal(0.0, donor_depth_sd)
            counts = rng.poisson(rng.gamma(2.0, library[:, None] * means * 0.5))  # NB, dispersion 0.5
            blocks.append(sp.csr_matrix(counts.astype(np.float32)))
            donors += [f"m{member}d{donor}"] * n_cells
            labels += [float(positive)] * n_cells
        obs = pd.DataFrame({"donor": donors, "endpoint": labels}, index=[f"m{member}c{i}" for i in range(len(donors))])
        members.append(ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=var))
    return members


def _donor_values(cells: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pseudobulk by donor, then library size + log1p: the donors' log values, endpoint, the genes
    measured here (a count in at least one donor) and the donors' libraries."""
    bulk = pseudobulk(cells, sample_column="donor", required_columns=["endpoint"])
    measured = bulk.X.sum(axis=0) > 0
    library = bulk.X.sum(axis=1)
    normalize(bulk, values="counts")
    return bulk.layers["log"], bulk.obs["endpoint"].to_numpy(dtype=np.float64), measured, library


@functools.cache
def _case(name: str) -> tuple[list, float, float]:
    """The members' donor values of a case, the share of zeros among the cells' counts and the positive
    donors' geometric-mean library relative to the negatives'."""
    members = _members(np.random.default_rng(SEED), *CASES[name])
    zeros = float(np.mean([1.0 - m.X.nnz / (m.n_obs * m.n_vars) for m in members]))
    donors = [_donor_values(m) for m in members]
    library = np.concatenate([d[3] for d in donors])
    positive = np.concatenate([d[1] for d in donors]) == 1.0
    ratio = float(np.exp(np.log(library[positive]).mean() - np.log(library[~positive]).mean()))
    return donors, zeros, ratio


def _pvalues(donors, *, trend: bool) -> np.ndarray:
    pieces = [site_linear_statistics(Y, x[:, None], measured=measured) for Y, x, measured, _ in donors]
    summed = {key: np.sum([piece[key] for piece in pieces], axis=0) for key in LINEAR_KEYS}
    fit = fit_linear_models(summed, columns=["endpoint"])
    p = ebayes(fit, trend=trend).p_value[:, 0]
    return p[np.isfinite(p)]


def _shares(p: np.ndarray) -> tuple[float, float]:
    return float(np.mean(p < 0.05)), float(np.mean(p < 0.001))


def _assert_calibrated(name: str, *, trend: bool, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="omics")
    donors, zeros, ratio = _case(name)
    assert 0.85 < zeros < 0.95
    assert sum(int(x.sum()) for _, x, _, _ in donors) == 6 and sum(len(x) for _, x, _, _ in donors) == 30
    assert not all(measured.all() for _, _, measured, _ in donors)  # the all-zero genes are exercised
    p = _pvalues(donors, trend=trend)
    assert p.size >= 0.99 * GENES
    low, tiny = _shares(p)
    assert 0.04 <= low <= 0.06 and 0.0003 <= tiny <= 0.002, (
        f"share p<0.05 {low:.4f}, p<0.001 {tiny:.5f}; positives' library {ratio:.2f}x the negatives'"
    )


@TREND
def test_three_members_pseudobulk_six_positive_donors(trend, caplog):
    """30-80 cells a donor, depth unrelated to the label. Measured at this seed: limma 0.0464 / 0.00150,
    limma-trend 0.0479 / 0.00175 (positives' library 1.13x the negatives'). Holds at this seed, not at
    every seed: 2 of 8 seeds fall outside the bounds, by the depth of the positives (module docstring)."""
    _assert_calibrated("any depth", trend=trend, caplog=caplog)


@TREND
def test_donors_of_equal_depth(trend, caplog):
    """55 cells a donor and no donor library factor: the route itself is calibrated (at this seed limma
    0.0457 / 0.00115, limma-trend 0.0464 / 0.00150; all 8 seeds tried inside the bounds)."""
    _assert_calibrated("equal depth", trend=trend, caplog=caplog)


@TREND
@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured at this seed: p<0.05 share 0.0853 (limma) and 0.0907 (limma-trend), p<0.001 0.0030 and "
        "0.0032; over 8 seeds 0.061-0.085 and 0.0018-0.0033 (limma), 0.064-0.091 and 0.0023-0.0032 (trend). "
        "Positive donors of 30-45 cells against negatives of 45-80 (common where diseased tissue yields "
        "fewer cells): their log values carry more technical variance, which one pooled variance per gene "
        "understates for the positive-negative difference of every gene at once. Log library size as a "
        "covariate only narrows it (p<0.05 0.058-0.068 over the 8 seeds, 0.0623 at this seed): the effect "
        "is on the variance, not the mean. limma's remedy is precision weights per donor (voom), not in the "
        "federated pipeline, which weights whole members only."
    ),
)
def test_positive_donors_with_fewer_cells(trend, caplog):
    _assert_calibrated("shallower positives", trend=trend, caplog=caplog)
