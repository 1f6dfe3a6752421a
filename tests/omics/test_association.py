"""Federated association statistics equal the pooled, member-stratified library analyses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.duration.hazard_regression import PHReg
from statsmodels.stats.multitest import multipletests

from omics.association import KEYS, association_table, combine, rank_genes_groups_record, site_statistics

P = 30
NAMES = [f"GENE{j:02d}" for j in range(P)]
PLANTED = ["GENE00", "GENE01", "GENE02"]
UNMEASURED = 5  # member 1 did not measure it
CONSTANT = 7  # constant within member 0
WEAK = 3  # survival: a weak effect for the one-step estimate


def _member(rng, n, shift, kind, *, tiny=False):
    X = rng.normal(loc=2.0 + shift + rng.normal(0, 0.5, P), scale=rng.uniform(0.5, 1.5, P), size=(n, P))
    if kind == "binary":
        y = np.zeros(n)
        y[rng.permutation(n)[: (3 if tiny else n // 2)]] = 1.0
        X[:, :3] += 1.2 * y[:, None]
        target = y
    elif kind == "regression":
        target = 0.8 * X[:, 0] - 0.7 * X[:, 1] + 0.6 * X[:, 2] + 3.0 * shift + rng.normal(size=n)
        if tiny:
            target[4:] = np.nan
    else:
        z = (X - X.mean(axis=0)) / X.std(axis=0)
        risk = 1.0 * z[:, 0] - 0.9 * z[:, 1] + 0.8 * z[:, 2] + 0.15 * z[:, WEAK]
        event_time = rng.exponential(np.exp(-risk - shift))
        censor = rng.exponential(2.0 * np.exp(-shift), n)
        time = np.round(np.minimum(event_time, censor), 1) + 0.05  # rounding creates ties
        event = (event_time <= censor).astype(float)
        if tiny:
            event[:] = 0.0
            event[:3] = 1.0
        target = np.column_stack([time, event])
    target = target.copy()
    target[rng.choice(n, 3, replace=False)] = np.nan  # missing labels
    return X, target


def _consortium(kind, seed=11):
    """Three members of different sizes and batch shifts, plus a tiny one below min_cell."""
    rng = np.random.default_rng(seed)
    members = [_member(rng, n, shift, kind) for n, shift in [(120, 0.0), (80, 0.7), (50, -0.5)]]
    members.append(_member(rng, 12, 0.3, kind, tiny=True))
    members[0][0][:, CONSTANT] = 1.5
    members[1][0][:, UNMEASURED] = np.nan
    measured = [np.ones(P, dtype=bool) for _ in members]
    measured[1][UNMEASURED] = False
    return members, measured


def _federated(kind, members, measured):
    stats_ = [site_statistics(X, y, kind=kind, measured=m) for (X, y), m in zip(members, measured, strict=True)]
    return stats_, association_table(combine(stats_), kind=kind, feature_names=NAMES)


def _pooled(members, j):
    """Feature j's pooled rows of the members that contribute to it (the tiny member never does)."""
    frames = []
    for m, (X, y) in enumerate(members[:3]):
        if (m == 1 and j == UNMEASURED) or (m == 0 and j == CONSTANT):
            continue
        frame = pd.DataFrame({"x": X[:, j], "member": m})
        y2 = y.reshape(len(y), -1)
        frame["y"], frame["event"] = y2[:, 0], y2[:, -1]
        frames.append(frame[~np.isnan(y2).any(axis=1)])
    return pd.concat(frames, ignore_index=True)


def _by_feature(table):
    return table.set_index("feature")


def test_binary_equals_the_stratified_combination_of_per_member_welch_tests():
    """Each member's Welch pieces from scipy, combined with stratified (CMH) sample-size weights."""
    members, measured = _consortium("binary")
    _, table = _federated("binary", members, measured)
    rows = _by_feature(table)
    for j, name in enumerate(NAMES):
        pooled = _pooled(members, j)
        num = den = var = 0.0
        for _, part in pooled.groupby("member"):
            g1, g0 = part.loc[part.y == 1, "x"], part.loc[part.y == 0, "x"]
            welch = stats.ttest_ind(g1, g0, equal_var=False)
            d = g1.mean() - g0.mean()
            w = len(g1) * len(g0) / (len(g1) + len(g0))
            num, den, var = num + w * d, den + w, var + w**2 * (d / welch.statistic) ** 2
        z = num / np.sqrt(var)
        assert rows.loc[name, "effect"] == pytest.approx(num / den, abs=1e-6)
        assert rows.loc[name, "statistic"] == pytest.approx(z, rel=1e-6, abs=1e-6)
        assert rows.loc[name, "pvalue"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-6, abs=1e-12)
        assert rows.loc[name, "members"] == pooled["member"].nunique()


def test_binary_with_one_member_is_welchs_t():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 4))
    y = (np.arange(60) % 3 == 0).astype(float)
    x[y == 1, 0] += 1.5
    table = association_table(site_statistics(x, y, kind="binary"), kind="binary", feature_names=list("abcd"))
    welch = stats.ttest_ind(x[y == 1], x[y == 0], equal_var=False)
    rows = table.set_index("feature")
    assert rows["statistic"].reindex(list("abcd")).to_numpy() == pytest.approx(welch.statistic, rel=1e-9)
    assert table["feature"].iloc[0] == "a"


def test_regression_equals_ols_with_member_covariate():
    members, measured = _consortium("regression")
    _, table = _federated("regression", members, measured)
    rows = _by_feature(table)
    for j, name in enumerate(NAMES):
        fit = smf.ols("y ~ x + C(member)", data=_pooled(members, j)).fit()
        assert rows.loc[name, "effect"] == pytest.approx(fit.params["x"], rel=1e-6, abs=1e-9)
        assert rows.loc[name, "statistic"] == pytest.approx(fit.tvalues["x"], rel=1e-6)
        assert rows.loc[name, "pvalue"] == pytest.approx(fit.pvalues["x"], rel=1e-6, abs=1e-12)


def test_survival_score_and_information_equal_stratified_phreg():
    members, measured = _consortium("survival")
    _, table = _federated("survival", members, measured)
    summed = combine(
        [site_statistics(X, y, kind="survival", measured=m) for (X, y), m in zip(members, measured, strict=True)]
    )
    rows = _by_feature(table)
    for j, name in enumerate(NAMES):
        pooled = _pooled(members, j)
        model = PHReg(pooled.y, pooled[["x"]], status=pooled.event, strata=pooled.member, ties="breslow")
        score, information = model.score(np.zeros(1))[0], -model.hessian(np.zeros(1))[0, 0]
        assert summed["score"][j] == pytest.approx(score, rel=1e-6)
        assert summed["information"][j] == pytest.approx(information, rel=1e-6)
        z = score / np.sqrt(information)
        assert rows.loc[name, "statistic"] == pytest.approx(z, rel=1e-6)
        assert rows.loc[name, "pvalue"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-6, abs=1e-12)
    weak = _pooled(members, WEAK)
    sd = np.sqrt(weak.groupby("member").x.apply(lambda v: ((v - v.mean()) ** 2).sum()).sum() / (len(weak) - 3))
    fitted = PHReg(weak.y, weak[["x"]], status=weak.event, strata=weak.member, ties="breslow").fit().params[0] * sd
    one_step = rows.loc[NAMES[WEAK], "effect"]
    assert np.sign(one_step) == np.sign(fitted)
    assert one_step == pytest.approx(fitted, abs=0.05)


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_table_layout_ranking_and_member_counts(kind):
    members, measured = _consortium(kind)
    stats_, table = _federated(kind, members, measured)
    assert list(table.columns) == ["feature", "statistic", "effect", "pvalue", "qvalue", "members"]
    assert all(set(s) == set(KEYS[kind]) for s in stats_)
    assert all(v.dtype == np.float64 and v.shape == (P,) for s in stats_ for v in s.values())
    assert sorted(table.feature[:3]) == PLANTED
    assert table.pvalue.is_monotonic_increasing
    assert table.qvalue.to_numpy() == pytest.approx(multipletests(table.pvalue, method="fdr_bh")[1])
    # the tiny member is below min_cell: nothing at all, so at most 3 members per feature
    assert all(np.all(v == 0) for v in stats_[3].values())
    counts = _by_feature(table).members
    assert counts[NAMES[UNMEASURED]] == 2 and counts[NAMES[CONSTANT]] == 2
    assert counts.drop([NAMES[UNMEASURED], NAMES[CONSTANT]]).eq(3).all()
    assert all(stats_[1][key][UNMEASURED] == 0 for key in KEYS[kind])


def test_small_cell_limit_is_inclusive_and_configurable():
    members, _ = _consortium("binary")
    X, y = members[3]  # 3 positives among the labelled samples
    assert site_statistics(X, y, kind="binary", min_cell=3)["members"].sum() == P
    assert not site_statistics(X, y, kind="binary", min_cell=4)["members"].any()


def test_feature_measured_by_no_member_is_dropped():
    members, _ = _consortium("regression")
    measured = np.ones(P, dtype=bool)
    measured[UNMEASURED] = False
    summed = combine([site_statistics(X, y, kind="regression", measured=measured) for X, y in members])
    table = association_table(summed, kind="regression", feature_names=NAMES)
    assert NAMES[UNMEASURED] not in set(table.feature) and len(table) == P - 1


def test_combine_refuses_mismatched_members():
    members, _ = _consortium("binary")
    X, y = members[0]
    binary = site_statistics(X, y, kind="binary")
    regression = site_statistics(X, np.nan_to_num(y), kind="regression")
    with pytest.raises(ValueError, match=r"stats\[1\] has keys"):
        combine([binary, regression])
    with pytest.raises(ValueError, match=r"stats\[1\]\['weight'\] has shape \(29,\), expected \(30,\)"):
        combine([binary, {**binary, "weight": binary["weight"][:-1]}])
    with pytest.raises(ValueError, match="no member statistics"):
        combine([])


def test_bad_input_is_refused_with_the_field_named():
    members, _ = _consortium("survival")
    X, target = members[0]
    with pytest.raises(ValueError, match=r"target for kind 'binary' must have shape \(120,\)"):
        site_statistics(X, target, kind="binary")
    with pytest.raises(ValueError, match=r"target for kind 'survival' must have shape \(120, 2\)"):
        site_statistics(X, target[:, 0], kind="survival")
    with pytest.raises(ValueError, match="kind must be one of"):
        site_statistics(X, target, kind="cox")
    with pytest.raises(ValueError, match="binary target must be 0/1"):
        site_statistics(X, np.full(len(X), 2.0), kind="binary")
    with pytest.raises(ValueError, match="event\\) must be 0/1"):
        site_statistics(X, np.column_stack([target[:, 0], np.full(len(X), 3.0)]), kind="survival")
    with pytest.raises(ValueError, match=r"measured must be a bool array of shape \(30,\)"):
        site_statistics(X, target, kind="survival", measured=np.ones(P))
    with pytest.raises(ValueError, match="non-finite values .*column 4"):
        site_statistics(np.where(np.arange(P) == 4, np.nan, X), target, kind="survival")
    with pytest.raises(ValueError, match="min_cell must be at least 2"):
        site_statistics(X, target, kind="survival", min_cell=1)
    with pytest.raises(ValueError, match="lack \\['weighted_effect'"):
        association_table({"members": np.ones(P)}, kind="binary", feature_names=NAMES)
    with pytest.raises(ValueError, match="feature_names has 2 names"):
        association_table(site_statistics(X, target, kind="survival"), kind="survival", feature_names=NAMES[:2])


def test_rank_genes_groups_record_reads_back_with_scanpy():
    import anndata as ad
    import scanpy as sc

    members, measured = _consortium("binary")
    _, table = _federated("binary", members, measured)
    adata = ad.AnnData(X=np.zeros((2, P), dtype=np.float32), var=pd.DataFrame(index=NAMES))
    adata.uns["rank_genes_groups"] = rank_genes_groups_record(table, group="response", kind="binary")
    back = sc.get.rank_genes_groups_df(adata, group="response")
    assert back.names.tolist() == table.feature.tolist()
    assert back.scores.to_numpy() == pytest.approx(table.statistic.to_numpy(), rel=1e-6)
    assert back.pvals.to_numpy() == pytest.approx(table.pvalue.to_numpy())
    assert back.pvals_adj.to_numpy() == pytest.approx(table.qvalue.to_numpy())
    assert back.logfoldchanges.to_numpy() == pytest.approx(table.effect.to_numpy() / np.log(2), rel=1e-6)
    assert adata.uns["rank_genes_groups"]["params"]["reference"] == "rest"


def test_module_imports_no_torch():
    code = "import sys, omics.association; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_survival_blocks_do_not_change_the_result(monkeypatch):
    members, _ = _consortium("survival")
    X, y = members[0]
    whole = site_statistics(X, y, kind="survival")
    monkeypatch.setattr("omics.association._BLOCK_ELEMENTS", 7 * len(X))  # blocks of 7 features
    blocked = site_statistics(X, y, kind="survival")
    for key in whole:
        np.testing.assert_allclose(blocked[key], whole[key], rtol=1e-12)


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_blocks_of_columns_give_the_statistics_of_the_whole_matrix(kind, monkeypatch):
    import omics.association as association

    members, measured = _consortium(kind)
    whole = [site_statistics(x, y, kind=kind, measured=m) for (x, y), m in zip(members, measured, strict=True)]
    monkeypatch.setattr(association, "_COLUMN_BLOCK", 4)  # 30 features: 8 blocks, the last one short
    blocked = [site_statistics(x, y, kind=kind, measured=m) for (x, y), m in zip(members, measured, strict=True)]
    for one, other in zip(whole, blocked, strict=True):
        for key in KEYS[kind]:
            np.testing.assert_allclose(one[key], other[key], rtol=1e-12, atol=0, err_msg=key)
