"""Federated voom (omics.voom) against limma's voom + lmFit(weights) + eBayes on the pooled counts.

References: pylimma (GPL-3.0, a test tool only; ``legacy=True`` as in test_linear_model.py), whose voom
calls statsmodels' lowess, and R (``stats::lowess``, limma's ``voom``) via ``Rscript`` when installed.
Our lowess is a port of R's ``clowess``: it equals R's to ~1e-13, statsmodels' to ~1e-9 (statsmodels
drops R's 0.001/0.999 cut-offs in the tricube and bisquare weights), hence the 1e-6 tolerance against
pylimma's voom weights and 1e-8 against R.

Calibration: the two cases that plain federated limma fails (test_calibration_pseudobulk.py's
shallower positive donors, test_calibration_linear.py's sparse per-cell counts), their data generation
copied here unchanged, run through federated voom.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import textwrap
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from omics import voom as vm
from omics.ebayes import ebayes
from omics.linear_model import LINEAR_KEYS, fit_linear_models, site_linear_statistics
from omics.pseudobulk import pseudobulk
from omics.voom import (
    VOOM_KEYS,
    Trend,
    log2_cpm,
    lowess,
    site_voom_statistics,
    site_weighted_statistics,
    voom_fitted_values,
    voom_trend,
    voom_weights,
)

pylimma = pytest.importorskip("pylimma")

SIZES = {"A": 30, "B": 20, "C": 12}
P = 600
COLUMNS = ["endpoint", "age"]


def _close(ours, ref, *, rtol):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.nanmax(np.abs(ref)), equal_nan=True)


def _consortium(seed: int = 5) -> dict:
    """Three members of RNA-seq counts (NB, dispersion 0.2), libraries 0.2-5 million and member-specific
    depth, a binary endpoint with 30 true effects and an age column; 6 features without any count."""
    rng = np.random.default_rng(seed)
    abundance = rng.lognormal(np.log(1 / P), 2.0, P)
    abundance[:6] = 0.0
    abundance /= abundance.sum()
    members = {}
    for index, (member, n) in enumerate(SIZES.items()):
        endpoint = rng.integers(0, 2, n).astype(float)
        age = rng.normal(55, 10, n).round()
        library = rng.lognormal(np.log(1e6) + 0.3 * index, 0.6, n)
        effect = np.ones(P)
        effect[6:36] = rng.choice([0.5, 2.0], 30)
        mean = library[:, None] * abundance * np.where(endpoint[:, None] == 1, effect, 1.0)
        counts = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(float)
        members[member] = {"counts": counts, "design": np.column_stack([endpoint, age]), "library": counts.sum(axis=1)}
    return members


def _sum(pieces: list[dict], keys) -> dict:
    return {key: np.sum([piece[key] for piece in pieces], axis=0) for key in keys}


def _federated_voom(members: dict, *, lib_size: bool = True, measured: dict | None = None, columns=COLUMNS):
    """The two rounds: returns the round-1 trend and fit, each member's weights and the weighted fit."""
    measured = measured or {}
    libraries = {m: (d["library"] if lib_size else d["counts"].sum(axis=1)) for m, d in members.items()}
    pieces = [
        site_voom_statistics(d["counts"], d["design"], lib_size=libraries[m], measured=measured.get(m))
        for m, d in members.items()
    ]
    summed = _sum(pieces, VOOM_KEYS)
    trend = voom_trend(summed, columns=columns)
    first = fit_linear_models(summed, columns=columns)
    weights, second = {}, []
    for m, d in members.items():
        y = log2_cpm(d["counts"], libraries[m])
        fitted = voom_fitted_values(y, d["design"], first, measured=measured.get(m))
        weights[m] = voom_weights(trend, fitted, libraries[m])
        second.append(site_weighted_statistics(y, d["design"], weights[m], measured=measured.get(m)))
    fit = fit_linear_models(_sum(second, LINEAR_KEYS), columns=columns)
    return trend, first, weights, fit


def _pooled_design(members: dict) -> np.ndarray:
    labels = np.concatenate([[m] * len(d["counts"]) for m, d in members.items()])
    dummies = pd.get_dummies(labels, drop_first=True).astype(float).to_numpy()
    return np.column_stack([np.ones(len(labels)), dummies, np.vstack([d["design"] for d in members.values()])])


@pytest.fixture(scope="module")
def chain():
    members = _consortium()
    trend, first, weights, fit = _federated_voom(members)
    counts = np.vstack([d["counts"] for d in members.values()])
    library = np.concatenate([d["library"] for d in members.values()])
    design = _pooled_design(members)
    reference = pylimma.voom(counts.T, design, lib_size=library, span=0.5, adaptive_span=False, save_plot=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_fit = pylimma.lm_fit(reference["E"], design, weights=reference["weights"])
    return {
        "members": members,
        "trend": trend,
        "first": first,
        "weights": np.vstack(list(weights.values())),
        "fit": fit,
        "reference": reference,
        "ref_fit": ref_fit,
        "offset": len(SIZES),
        "counts": counts,
        "library": library,
        "design": design,
    }


# --- lowess ---------------------------------------------------------------------------------------


def _scatter(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    x[: n // 5] = np.round(x[: n // 5], 1)  # ties
    return x, np.sin(x) + 0.3 * rng.standard_t(3, size=n)


@pytest.mark.parametrize("n", [2, 7, 50, 3000])
def test_lowess_follows_statsmodels(n):
    from statsmodels.nonparametric.smoothers_lowess import lowess as sm_lowess

    x, y = _scatter(n)
    xs, ys = lowess(x, y, f=0.5)
    reference = sm_lowess(y, x, frac=0.5, it=3, delta=0.01 * np.ptp(x))
    np.testing.assert_array_equal(xs, reference[:, 0])
    np.testing.assert_allclose(ys, reference[:, 1], rtol=1e-7, atol=1e-7)


def _rscript(script: str, directory) -> None:
    (directory / "run.R").write_text(textwrap.dedent(script))
    subprocess.run(["Rscript", str(directory / "run.R")], check=True, capture_output=True, timeout=120, cwd=directory)


def _r_has(package: str) -> bool:
    if shutil.which("Rscript") is None:
        return False
    return subprocess.run(["Rscript", "-e", f"library({package})"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _r_has("stats"), reason="Rscript is not installed")
def test_lowess_equals_r(tmp_path):
    x, y = _scatter(5000)
    np.savetxt(tmp_path / "xy.txt", np.c_[x, y], fmt="%.17g")
    _rscript(
        """
        a <- read.table("xy.txt")
        for (f in c(0.5, 0.2)) {
          l <- lowess(a[, 1], a[, 2], f = f)
          write.table(format(l$y, digits = 17), paste0("y", f, ".txt"), row.names = FALSE, col.names = FALSE,
                      quote = FALSE)
        }
        """,
        tmp_path,
    )
    for f in (0.5, 0.2):
        np.testing.assert_allclose(lowess(x, y, f=f)[1], np.loadtxt(tmp_path / f"y{f}.txt"), rtol=1e-10, atol=1e-12)


# --- weighted least squares -------------------------------------------------------------------------


def test_weighted_statistics_layout_and_unmeasured_features_are_zero():
    members = _consortium()
    d = members["B"]
    rng = np.random.default_rng(0)
    measured = np.ones(P, dtype=bool)
    measured[7] = False
    y = log2_cpm(d["counts"], d["library"])
    y[:, 7] = np.nan
    w = rng.lognormal(0, 0.5, y.shape)
    w[:, 7] = -1.0  # anything where not measured
    pieces = site_weighted_statistics(y, d["design"], w, measured=measured)
    plain = site_linear_statistics(y, d["design"], measured=measured)
    assert tuple(pieces) == LINEAR_KEYS
    assert all(pieces[key].shape == plain[key].shape and pieces[key].dtype == np.float64 for key in LINEAR_KEYS)
    assert all(not np.any(pieces[key][7]) for key in LINEAR_KEYS)
    np.testing.assert_array_equal(pieces["ysum"], plain["ysum"])  # unweighted
    np.testing.assert_array_equal(pieces["samples"], plain["samples"])
    # constant weights c: the ordinary pieces times c (within-member weighted mean = plain mean)
    scaled = site_weighted_statistics(y, d["design"], np.full(y.shape, 2.5), measured=measured)
    for key in ("xtx", "xty", "yty"):
        np.testing.assert_allclose(scaled[key], 2.5 * plain[key], rtol=1e-10, atol=1e-9)
    # one feature by hand: X_c' W X_c with the weighted means
    g = 3
    xc = d["design"] - (w[:, g] @ d["design"]) / w[:, g].sum()
    yc = y[:, g] - (w[:, g] @ y[:, g]) / w[:, g].sum()
    np.testing.assert_allclose(pieces["xtx"][g], (xc.T @ (w[:, g, None] * xc))[np.triu_indices(2)], rtol=1e-10)
    np.testing.assert_allclose(pieces["xty"][g], xc.T @ (w[:, g] * yc), rtol=1e-10)
    np.testing.assert_allclose(pieces["yty"][g], yc @ (w[:, g] * yc), rtol=1e-10)


def test_weighted_statistics_do_not_depend_on_the_column_block(monkeypatch):
    d = _consortium()["A"]
    y = log2_cpm(d["counts"], d["library"])
    w = np.random.default_rng(1).lognormal(0, 0.5, y.shape)
    whole = site_weighted_statistics(y, d["design"], w)
    monkeypatch.setattr(vm, "_COLUMN_BLOCK", 7)
    for key, value in site_weighted_statistics(y, d["design"], w).items():
        np.testing.assert_allclose(value, whole[key], rtol=1e-12, atol=1e-9)


def test_weighted_fit_equals_lmfit_with_weights_on_the_pooled_data():
    """Arbitrary observation weights, member C not measuring feature 7: lmFit(weights) + eBayes with the
    member dummies, to 1e-8."""
    members = _consortium()
    rng = np.random.default_rng(2)
    measured = {m: np.ones(P, dtype=bool) for m in members}
    measured["C"][7] = False
    pieces, Ys, Ws = [], [], []
    for m, d in members.items():
        y = log2_cpm(d["counts"], d["library"])
        w = rng.lognormal(0, 0.7, y.shape)
        pieces.append(site_weighted_statistics(y, d["design"], w, measured=measured[m]))
        y = y.copy()
        y[:, ~measured[m]] = np.nan
        Ys.append(y)
        Ws.append(w)
    fit = fit_linear_models(_sum(pieces, LINEAR_KEYS), columns=COLUMNS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Partial NA coefficients": C's dummy for feature 7
        ref = pylimma.lm_fit(np.vstack(Ys).T, _pooled_design(members), weights=np.vstack(Ws).T)
    k0 = len(SIZES)
    _close(fit.coefficients, ref["coefficients"][:, k0:], rtol=1e-8)
    _close(fit.stdev_unscaled, ref["stdev_unscaled"][:, k0:], rtol=1e-8)
    _close(fit.sigma, ref["sigma"], rtol=1e-8)
    _close(fit.df_residual, ref["df_residual"], rtol=0)
    _close(fit.amean, ref["Amean"], rtol=1e-12)
    for trend in (False, True):
        moderated, reference = ebayes(fit, trend=trend), pylimma.e_bayes(dict(ref), trend=trend, legacy=True)
        _close(moderated.t, reference["t"][:, k0:], rtol=1e-8)
        _close(moderated.p_value, reference["p_value"][:, k0:], rtol=1e-8)


def test_weighted_statistics_reject_bad_weights():
    d = _consortium()["A"]
    y = log2_cpm(d["counts"], d["library"])
    with pytest.raises(ValueError, match="weights must have the shape of Y"):
        site_weighted_statistics(y, d["design"], np.ones((2, 2)))
    w = np.ones(y.shape)
    w[3, 9] = 0.0
    with pytest.raises(ValueError, match=r"not positive and finite \(first: column 9\)"):
        site_weighted_statistics(y, d["design"], w)
    with pytest.raises(ValueError, match="counts must be non-negative"):
        site_voom_statistics(-d["counts"], d["design"])


# --- the voom chain ---------------------------------------------------------------------------------


def test_round_one_gives_voom_sigma_amean_and_trend(chain):
    ref, k0 = chain["reference"], chain["offset"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = pylimma.lm_fit(ref["E"], chain["design"])
    _close(chain["first"].sigma, plain["sigma"], rtol=1e-10)
    _close(chain["first"].amean, plain["Amean"], rtol=1e-12)
    _close(chain["first"].coefficients, plain["coefficients"][:, k0:], rtol=1e-10)
    trend = chain["trend"]
    assert isinstance(trend, Trend) and trend.features == P - 6  # the all-zero features are left out
    line = ref["voom_line"]
    np.testing.assert_allclose(trend.x, np.unique(line["x"]), rtol=1e-12)
    np.testing.assert_allclose(trend(line["x"]), line["y"], rtol=1e-6)


def test_voom_weights_and_moderated_statistics_match_pylimma(chain):
    """Weights, weighted fit and moderated t / p of federated voom against pylimma's voom on the pooled
    counts with the member dummies: 1e-6 (lowess: R's algorithm here, statsmodels' in pylimma)."""
    ref, ref_fit, k0 = chain["reference"], chain["ref_fit"], chain["offset"]
    _close(chain["weights"], ref["weights"].T, rtol=1e-6)
    fit = chain["fit"]
    _close(fit.coefficients, ref_fit["coefficients"][:, k0:], rtol=1e-6)
    _close(fit.sigma, ref_fit["sigma"], rtol=1e-6)
    _close(fit.df_residual, ref_fit["df_residual"], rtol=0)
    _close(fit.amean, ref_fit["Amean"], rtol=1e-12)
    for trend in (False, True):
        moderated, reference = ebayes(fit, trend=trend), pylimma.e_bayes(dict(ref_fit), trend=trend, legacy=True)
        _close(moderated.t, reference["t"][:, k0:], rtol=1e-6)
        _close(moderated.p_value, reference["p_value"][:, k0:], rtol=1e-6)
    p = ebayes(fit).p_value[:, 0]
    assert np.mean(p[6:36] < 0.01) > 0.3 and np.mean(p[36:] < 0.01) < 0.02  # the true effects stand out


@pytest.mark.skipif(not _r_has("limma"), reason="Rscript or the limma R package is not installed")
def test_voom_chain_equals_r_limma(chain, tmp_path):
    """Against R limma itself (same lowess algorithm): weights and p-values to 1e-8."""
    np.savetxt(tmp_path / "counts.txt", chain["counts"].T, fmt="%d")
    np.savetxt(tmp_path / "design.txt", chain["design"], fmt="%.17g")
    np.savetxt(tmp_path / "library.txt", chain["library"], fmt="%.17g")
    _rscript(
        """
        suppressMessages(library(limma))
        counts <- as.matrix(read.table("counts.txt"))
        design <- as.matrix(read.table("design.txt"))
        v <- voom(counts, design, lib.size = scan("library.txt", quiet = TRUE))
        fit <- eBayes(lmFit(v, design))
        write.table(format(v$weights, digits = 17), "weights.txt", row.names = FALSE, col.names = FALSE, quote = FALSE)
        write.table(format(fit$p.value, digits = 17), "p.txt", row.names = FALSE, col.names = FALSE, quote = FALSE)
        """,
        tmp_path,
    )
    k0 = chain["offset"]
    _close(chain["weights"], np.loadtxt(tmp_path / "weights.txt").T, rtol=1e-8)
    _close(ebayes(chain["fit"]).p_value, np.loadtxt(tmp_path / "p.txt")[:, k0:], rtol=1e-8)


def test_member_library_sizes_default_to_row_sums():
    members = _consortium()
    d = members["A"]
    pieces = site_voom_statistics(d["counts"], d["design"])
    np.testing.assert_allclose(pieces["log_library"], np.sum(np.log2(d["counts"].sum(axis=1) + 1)))
    assert tuple(pieces) == VOOM_KEYS and pieces["detected"][0] == 0 and pieces["detected"][100] > 0
    np.testing.assert_array_equal(log2_cpm(d["counts"]), log2_cpm(d["counts"], d["counts"].sum(axis=1)))


def test_unmeasured_features_get_unit_weights_and_no_pieces():
    members = _consortium()
    measured = {m: np.ones(P, dtype=bool) for m in members}
    measured["B"][50] = False
    _, _, weights, fit = _federated_voom(members, measured=measured)
    assert np.all(weights["B"][:, 50] == 1.0) and np.all(weights["A"][:, 50] != 1.0)
    assert fit.samples[50] == SIZES["A"] + SIZES["C"] and np.isfinite(fit.sigma[50])


def test_trend_needs_two_features():
    d = _consortium()["A"]
    summed = site_voom_statistics(d["counts"][:, :8], d["design"])  # 6 all-zero features, 2 with counts
    assert voom_trend(summed, columns=COLUMNS).features == 2
    summed["detected"][6] = 0.0
    with pytest.raises(ValueError, match="voom needs at least two"):
        voom_trend(summed, columns=COLUMNS)
    with pytest.raises(ValueError, match="summed lacks"):
        voom_trend({k: summed[k] for k in LINEAR_KEYS}, columns=COLUMNS)


# --- calibration --------------------------------------------------------------------------------------
#
# The data generation below is copied unchanged from test_calibration_pseudobulk.py (SEED, GENES, DONORS,
# _cells_fewer_in_positives, _members) and test_calibration_linear.py (_sparse_members, with SEED + 3),
# except that _sparse_members returns the counts (and the simulated libraries) instead of log1p(CP10k).

SEED = 2024
GENES = 20_000
FEATURES = 20_000
DONORS = (8, 10, 12)
POSITIVES_PER_MEMBER = 2


def _cells_fewer_in_positives(rng, positive: bool) -> int:
    return int(rng.integers(30, 46) if positive else rng.integers(45, 81))


def _members(rng, cells_per_donor=_cells_fewer_in_positives, donor_depth_sd: float = 0.2) -> list[ad.AnnData]:
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


def _sparse_members(rng) -> list:
    members = []
    for n in (40, 50, 60):
        library = rng.lognormal(np.log(3000), 0.5, n)
        abundance = rng.lognormal(np.log(1 / FEATURES), 1.5, FEATURES)
        abundance /= abundance.sum()
        counts = rng.poisson(rng.gamma(1 / 0.5, library[:, None] * abundance * 0.5))
        endpoint = np.zeros(n)
        endpoint[:2] = 1.0
        members.append((counts.astype(np.float64), endpoint))
    return members


@functools.cache
def _pseudobulk_donors(seed: int) -> tuple:
    """Per member: donor counts, endpoint, measured (a count in some donor) as in the pseudobulk test."""
    out = []
    for cells in _members(np.random.default_rng(seed)):
        bulk = pseudobulk(cells, sample_column="donor", required_columns=["endpoint"])
        counts = np.asarray(bulk.X.toarray() if sp.issparse(bulk.X) else bulk.X, dtype=np.float64)
        out.append((counts, bulk.obs["endpoint"].to_numpy(dtype=np.float64), counts.sum(axis=0) > 0))
    return tuple(out)


def voom_pvalues(members, *, trend: bool = False) -> np.ndarray:
    """``members``: list of ``(counts, endpoint, measured)``; federated voom, the endpoint the only column,
    library sizes the counts' row sums (voom's default)."""
    data = {i: {"counts": c, "design": x[:, None], "library": c.sum(axis=1)} for i, (c, x, _) in enumerate(members)}
    measured = {i: m for i, (_, _, m) in enumerate(members)}
    _, _, _, fit = _federated_voom(data, measured=measured, columns=["endpoint"])
    p = ebayes(fit, trend=trend).p_value[:, 0]
    return p[np.isfinite(p)]


def calibration_case(name: str, seed: int) -> list:
    if name == "pseudobulk":
        return list(_pseudobulk_donors(seed))
    return [(c, x, np.ones(c.shape[1], dtype=bool)) for c, x in _sparse_members(np.random.default_rng(seed))]


def _assert_calibrated(p: np.ndarray, minimum: int) -> None:
    assert p.size >= minimum
    low, tiny = float(np.mean(p < 0.05)), float(np.mean(p < 0.001))
    assert 0.04 <= low <= 0.06 and 0.0003 <= tiny <= 0.002, f"share p<0.05 {low:.4f}, p<0.001 {tiny:.5f}"


TREND = pytest.mark.parametrize("trend", [False, True], ids=["voom", "voom-trend"])


@TREND
@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured at this seed (2024): p<0.05 share 0.1201 (voom) and 0.1210 (eBayes trend=True), p<0.001 "
        "0.00531 and 0.00701 (plain limma: 0.0853 / 0.0030); over seeds 2024-2031 0.059-0.120 and "
        "0.0012-0.0053 (voom), 0.060-0.121 and 0.0015-0.0070 (trend); outside the bounds at all 8. The excess "
        "is in the low-count genes (at this seed by AveExpr quartile: 0.285, 0.087, 0.060, 0.049), all with "
        "positive t: the positive donors' libraries are 0.5-0.7x the negatives', and voom's log2((count + 0.5) "
        "/ (lib + 1) * 1e6) puts a zero or a low count of a small library higher, a shift of the mean that "
        "no weight corrects. limma runs voom after a low-count filter (filterByExpr); with a label-blind one "
        "(count >= 10 at the median library in >= 70% of a member's donors, 3,400-4,400 genes kept; voom, "
        "not asserted here) 0.051-0.063 and 0.0007-0.0026 over the 8 seeds, 0.0633 / 0.00119 at this seed."
    ),
)
def test_calibration_pseudobulk_positive_donors_with_fewer_cells(trend, caplog):
    caplog.set_level(logging.ERROR, logger="omics")
    _assert_calibrated(voom_pvalues(calibration_case("pseudobulk", SEED), trend=trend), 0.99 * GENES)


@TREND
@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured at this seed (2027): p<0.05 share 0.0127 (voom) and 0.0109 (trend), p<0.001 0.00010 and "
        "0.00005: conservative (plain limma: 0.0505 / 0.0073). Over seeds 2027-2034 0.0036-0.106 and "
        "0.0000-0.0013 (voom), inside both bounds at 1 of 8 (2030: 0.0466 / 0.00040). The mean t over genes is "
        "positive in every AveExpr quartile at the two seeds examined (2027: +0.31 to +0.40, positives at 0.89x "
        "the negatives' library; 2032: +1.03 to +1.44 and 0.106, at 0.71x): a shift common to all genes, as "
        "the log2-CPM of a zero is -log2(lib + 1) + const with ~90% zeros; why 2027 is conservative is not "
        "established. voom's weights do not address the shift; a low-count filter (as for the pseudobulk case) "
        "keeps 3 genes at ~3,000 counts a cell."
    ),
)
def test_calibration_sparse_counts_six_positives(trend, caplog):
    caplog.set_level(logging.ERROR, logger="omics")
    _assert_calibrated(voom_pvalues(calibration_case("sparse", SEED + 3), trend=trend), 4000)
