from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score

from models.data import MemberData, TaskSpec
from models.metrics import auprc, auroc, c_index, evaluate, pearson_r, primary_metric, r2
from models.network import MultitaskNet


def c_index_brute_force(time, event, risk):
    concordant, comparable = 0.0, 0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] == 1 and (time[i] < time[j] or (time[i] == time[j] and event[j] == 0)):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_auroc_and_auprc_match_sklearn_with_ties_and_missing_labels(rng):
    y = rng.integers(0, 2, 120).astype(float)
    score = np.round(y * 0.5 + rng.normal(size=120), 1)  # rounding makes tied scores
    y_missing = y.copy()
    y_missing[:15] = np.nan
    keep = ~np.isnan(y_missing)
    assert auroc(y_missing, score) == pytest.approx(roc_auc_score(y[keep], score[keep]), abs=1e-12)
    assert auprc(y_missing, score) == pytest.approx(average_precision_score(y[keep], score[keep]), abs=1e-12)
    assert auprc(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)


def test_r2_and_pearson_match_sklearn_and_scipy(rng):
    y = rng.normal(size=80)
    prediction = 0.7 * y + rng.normal(size=80) * 0.5
    y_missing = y.copy()
    y_missing[[3, 9]] = np.nan
    keep = ~np.isnan(y_missing)
    assert r2(y_missing, prediction) == pytest.approx(r2_score(y[keep], prediction[keep]), abs=1e-12)
    assert pearson_r(y_missing, prediction) == pytest.approx(pearsonr(y[keep], prediction[keep])[0], abs=1e-12)


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


def test_metrics_are_nan_when_undefined():
    assert math.isnan(auroc(np.array([1.0, 1.0, np.nan]), np.array([0.1, 0.2, 0.3])))
    assert math.isnan(auprc(np.array([0.0, 0.0]), np.array([0.1, 0.2])))
    assert math.isnan(r2(np.array([1.0, np.nan]), np.array([1.0, 2.0])))
    assert math.isnan(pearson_r(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))
    assert math.isnan(c_index(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([0.1, 0.2])))


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
    assert set(result["b"]) == {"auroc", "auprc"} and math.isnan(result["b"]["auroc"])
    assert set(result["r"]) == {"r2", "pearson_r"} and math.isfinite(result["r"]["pearson_r"])
    assert 0.0 <= result["s"]["c_index"] <= 1.0
