"""Metrics against brute-force definitions on small hand-made data (not against the libraries used)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.data import MemberData, TaskSpec
from models.metrics import auprc, auroc, c_index, evaluate, pearson_r, primary_metric, r2, spearman_r
from models.network import MultitaskNet


def auroc_brute_force(y, score):
    pos, neg = score[y == 1], score[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


def auprc_brute_force(y, score):
    """Precision at each distinct threshold, weighted by the recall it adds."""
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(score), reverse=True):
        called = score >= threshold
        recall = (called & (y == 1)).sum() / (y == 1).sum()
        total += (recall - previous_recall) * (called & (y == 1)).sum() / called.sum()
        previous_recall = recall
    return total


def c_index_brute_force(time, event, risk, strata=None):
    strata = np.zeros(len(time)) if strata is None else strata
    concordant, comparable = 0.0, 0
    for i in range(len(time)):
        for j in range(len(time)):
            if strata[i] != strata[j]:
                continue
            if event[i] == 1 and (time[i] < time[j] or (time[i] == time[j] and event[j] == 0)):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_auroc_and_auprc_of_a_hand_worked_example():
    y = np.array([0.0, 0.0, 1.0, 1.0])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(y, score) == pytest.approx(0.75, abs=1e-12)  # 3 of 4 (pos, neg) pairs ordered
    assert auprc(y, score) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3, abs=1e-12)


def test_auroc_and_auprc_match_brute_force_with_ties_and_missing_labels(rng):
    y = rng.integers(0, 2, 60).astype(float)
    score = np.round(y * 0.5 + rng.normal(size=60), 1)  # rounding makes tied scores
    y_missing = y.copy()
    y_missing[:8] = np.nan
    assert auroc(y_missing, score) == pytest.approx(auroc_brute_force(y[8:], score[8:]), abs=1e-12)
    assert auprc(y_missing, score) == pytest.approx(auprc_brute_force(y[8:], score[8:]), abs=1e-12)
    assert auprc(y, score) == pytest.approx(auprc_brute_force(y, score), abs=1e-12)


def test_r2_and_pearson_match_their_definitions(rng):
    y = rng.normal(size=40)
    prediction = 0.7 * y + rng.normal(size=40) * 0.5
    y_missing = y.copy()
    y_missing[[3, 9]] = np.nan
    yk, pk = np.delete(y, [3, 9]), np.delete(prediction, [3, 9])
    expected_r2 = 1 - np.sum((yk - pk) ** 2) / np.sum((yk - yk.mean()) ** 2)
    dy, dp = yk - yk.mean(), pk - pk.mean()
    expected_r = (dy @ dp) / math.sqrt((dy @ dy) * (dp @ dp))
    assert r2(y_missing, prediction) == pytest.approx(expected_r2, abs=1e-12)
    assert pearson_r(y_missing, prediction) == pytest.approx(expected_r, abs=1e-12)
    assert r2(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert pearson_r(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_c_index_matches_brute_force_with_tied_times_and_risks(rng):
    time = rng.integers(1, 15, 90).astype(float)
    event = (rng.random(90) < 0.6).astype(float)
    risk = np.round(-time / 5 + rng.normal(size=90), 1)
    survival = np.c_[time, event]
    assert c_index(survival, risk) == pytest.approx(c_index_brute_force(time, event, risk), abs=1e-12)
    survival_missing = survival.copy()
    survival_missing[:10, 0] = np.nan
    expected = c_index_brute_force(time[10:], event[10:], risk[10:])
    assert c_index(survival_missing, risk) == pytest.approx(expected, abs=1e-12)


def test_c_index_of_perfect_and_reversed_risk():
    survival = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]])
    assert c_index(survival, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert c_index(survival, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0


def test_c_index_within_strata_compares_only_pairs_in_the_same_stratum():
    # each member ranks its own samples perfectly, but member b's risks sit on another scale
    survival = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 0.0], [1.5, 1.0], [2.5, 1.0], [3.5, 0.0]])
    risk = np.array([3.0, 2.0, 1.0, 13.0, 12.0, 11.0])
    strata = np.array(["a", "a", "a", "b", "b", "b"])
    assert c_index(survival, risk, strata=strata) == 1.0
    assert c_index(survival, risk) < 1.0
    assert c_index(survival, risk) == pytest.approx(
        c_index_brute_force(survival[:, 0], survival[:, 1], risk), abs=1e-12
    )


def test_c_index_within_strata_matches_brute_force_with_missing_labels(rng):
    n = 80
    time = rng.integers(1, 12, n).astype(float)
    event = (rng.random(n) < 0.6).astype(float)
    risk = np.round(-time / 4 + rng.normal(size=n), 1)
    strata = rng.integers(0, 3, n)
    survival = np.c_[time, event]
    survival[:6, 1] = np.nan
    expected = c_index_brute_force(time[6:], event[6:], risk[6:], strata[6:])
    assert c_index(survival, risk, strata=strata) == pytest.approx(expected, abs=1e-12)
    # a stratum with no comparable pair (all censored) adds nothing
    only_censored = np.c_[[5.0, 6.0], [0.0, 0.0]]
    padded = c_index(np.r_[survival, only_censored], np.r_[risk, 1.0, 2.0], strata=np.r_[strata, 9, 9])
    assert padded == pytest.approx(expected, abs=1e-12)


def test_c_index_rejects_misshapen_input():
    with pytest.raises(ValueError, match=r"strata has shape \(2,\); expected \(3,\)"):
        c_index(np.ones((3, 2)), np.ones(3), strata=np.array([0, 1]))
    with pytest.raises(ValueError, match="expected \\(n, 2\\)"):
        c_index(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        auroc(np.array([0.0, 1.0, 1.0]), np.array([0.1, 0.2]))


def test_metrics_are_nan_when_undefined():
    assert math.isnan(auroc(np.array([1.0, 1.0, np.nan]), np.array([0.1, 0.2, 0.3])))
    assert math.isnan(auprc(np.array([0.0, 0.0]), np.array([0.1, 0.2])))
    assert math.isnan(auprc(np.array([1.0, 1.0]), np.array([0.1, 0.2])))
    assert math.isnan(r2(np.array([1.0, np.nan]), np.array([1.0, 2.0])))
    assert math.isnan(r2(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])))
    assert math.isnan(pearson_r(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))
    assert math.isnan(pearson_r(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])))
    assert math.isnan(c_index(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([0.1, 0.2])))
    assert math.isnan(c_index(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0.1, 0.2])))  # tied events
    assert math.isnan(c_index(np.array([[1.0, 1.0]]), np.array([0.1])))
    # samples in different strata are never compared
    assert math.isnan(c_index(np.array([[1.0, 1.0], [2.0, 1.0]]), np.array([0.2, 0.1]), strata=np.array([0, 1])))


def test_metrics_are_nan_for_non_finite_predictions():
    y = np.array([0.0, 1.0, 0.0, 1.0])
    bad = np.array([0.1, np.nan, 0.3, 0.4])
    assert math.isnan(auroc(y, bad)) and math.isnan(auprc(y, bad))
    assert math.isnan(r2(y, bad)) and math.isnan(pearson_r(y, bad))
    assert math.isnan(c_index(np.c_[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]], np.r_[bad[:3], np.inf]))
    # a non-finite prediction for a missing label does not matter
    assert auroc(np.r_[y, np.nan], np.r_[y, np.nan]) == 1.0


def test_primary_metric():
    assert [primary_metric(k) for k in ("binary", "regression", "survival")] == ["auroc", "r2", "c_index"]
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'"):
        primary_metric("ordinal")


def test_evaluate_returns_every_metric_and_nan_for_thin_splits(rng):
    n = 30
    X = rng.normal(size=(n, 5)).astype(np.float32)
    split = np.array(["train"] * 20 + ["test"] * 10)
    binary = rng.integers(0, 2, n).astype(float)
    binary[20:] = 1.0  # one class in test: AUROC undefined
    tasks = [TaskSpec("b", "binary"), TaskSpec("r", "regression"), TaskSpec("s", "survival")]
    data = MemberData(
        X=X,
        targets={"b": binary, "r": rng.normal(size=n), "s": np.c_[rng.uniform(1, 9, n), np.ones(n)]},
        split=split,
    )
    model = MultitaskNet(5, tasks, trunk_widths=(8,), head_width=0, dropout=0.0, seed=0)
    result = evaluate(model, data, tasks, split="test")
    assert set(result) == {"b", "r", "s"}
    binary = {"auroc", "auprc", "brier", "calibration_slope", "calibration_in_the_large"}
    assert set(result["b"]) == binary and math.isnan(result["b"]["auroc"])
    assert set(result["r"]) == {"r2", "pearson_r", "spearman_r"} and math.isfinite(result["r"]["pearson_r"])
    assert 0.0 <= result["s"]["c_index"] <= 1.0


def test_spearman_is_the_rank_correlation_on_labelled_samples():
    """Ranks of [1, 2, 3, 4] against [10, 30, 20, 40]: d = (0, 1, -1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8."""
    y = np.array([1.0, 2.0, np.nan, 3.0, 4.0])
    prediction = np.array([10.0, 30.0, 99.0, 20.0, 40.0])
    assert spearman_r(y, prediction) == pytest.approx(0.8, abs=1e-12)
    assert spearman_r(np.array([1.0, 2.0, 3.0]), np.exp(np.array([1.0, 2.0, 3.0]))) == pytest.approx(1.0)
    assert math.isnan(spearman_r(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])))


def test_calibration_of_binary_probabilities_on_simulated_labels():
    from scipy.special import expit
    from sklearn.metrics import brier_score_loss

    from models.metrics import brier, calibration_in_the_large, calibration_slope

    rng = np.random.default_rng(3)
    logit = rng.normal(scale=1.5, size=20_000)
    y = (rng.random(logit.size) < expit(logit)).astype(float)  # labels drawn from the model's own probabilities
    assert abs(calibration_slope(y, logit) - 1.0) < 0.05
    assert abs(calibration_in_the_large(y, logit)) < 0.01
    assert calibration_slope(y, 2.0 * logit) == pytest.approx(0.5, abs=0.03)  # too extreme: slope below 1
    assert calibration_in_the_large(y, logit - 1.0) > 0.1  # under-predicts the event rate
    assert brier(y, logit) == pytest.approx(brier_score_loss(y, expit(logit)))
    y[:10] = np.nan  # unlabelled samples are skipped, as by every metric
    assert np.isfinite(calibration_slope(y, logit))
    assert np.isnan(calibration_slope(y[:25], logit[:25]))  # 15 labels: too few for a slope
    separated = np.r_[np.zeros(20), np.ones(20)]
    assert np.isnan(calibration_slope(separated, np.r_[-np.ones(20), np.ones(20)]))  # no finite fit
