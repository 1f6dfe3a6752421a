from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import auroc, c_index, r2
from models.uncertainty import (
    Interval,
    _auroc_rows,
    _c_index_rows,
    _r2_rows,
    _resample,
    metric_interval,
    paired_difference_interval,
)


def synthetic(kind: str, n: int, *, seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a prediction that carries a planted signal plus ``noise``."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    prediction = signal + noise * rng.normal(size=n)
    if kind == "binary":
        return (signal > 0).astype(float), prediction
    if kind == "regression":
        return signal, prediction
    time = np.exp(-signal + 0.5 * rng.normal(size=n))
    return np.c_[time, rng.random(n) < 0.7], prediction


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_interval_brackets_the_point_estimate(kind):
    y, prediction = synthetic(kind, 200)
    y[:10] = np.nan  # missing labels are dropped, not resampled
    interval = metric_interval(kind, y, prediction, n_boot=300)
    expected = {"binary": auroc, "regression": r2, "survival": c_index}[kind](y, prediction)
    assert interval.estimate == pytest.approx(expected, abs=1e-12)
    assert interval.low < interval.estimate < interval.high
    assert interval.n == 190
    assert interval.to_dict() == {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "n": 190}


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_interval_narrows_with_more_samples(kind):
    small = metric_interval(kind, *synthetic(kind, 100, seed=1), n_boot=300)
    large = metric_interval(kind, *synthetic(kind, 1600, seed=1), n_boot=300)
    assert large.high - large.low < (small.high - small.low) / 2


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_paired_interval_of_identical_predictions_is_exactly_zero(kind):
    y, prediction = synthetic(kind, 150)
    strata = np.repeat(["a", "b", "c"], 50)
    assert paired_difference_interval(kind, y, prediction, prediction.copy(), strata=strata) == Interval(
        0.0, 0.0, 0.0, 150
    )


def test_paired_interval_finds_the_better_prediction():
    y, good = synthetic("regression", 300, noise=0.5)
    worse = good + 0.5 * np.random.default_rng(5).normal(size=300)
    difference = paired_difference_interval("regression", y, good, worse, n_boot=500)
    assert difference.estimate == pytest.approx(r2(y, good) - r2(y, worse))
    assert 0.0 < difference.low < difference.estimate < difference.high
    # pairing cancels the variation the arms share: narrower than if the arms were independent
    arms = [metric_interval("regression", y, p, n_boot=500) for p in (good, worse)]
    width_a, width_b = (arm.high - arm.low for arm in arms)
    assert difference.high - difference.low < 0.75 * math.hypot(width_a, width_b)


def test_intervals_are_deterministic_for_a_seed():
    y, prediction = synthetic("binary", 120)
    first = metric_interval("binary", y, prediction, n_boot=200, seed=3)
    assert metric_interval("binary", y, prediction, n_boot=200, seed=3) == first
    assert metric_interval("binary", y, prediction, n_boot=200, seed=4) != first
    wider = metric_interval("binary", y, prediction, n_boot=200, seed=3, level=0.99)
    assert wider.low <= first.low and wider.high >= first.high


def test_resampling_keeps_each_stratum_and_its_size():
    groups = np.array([0, 0, 1, 1, 1, 1, 2])
    rows = _resample(groups, 40, np.random.default_rng(0))
    assert rows.shape == (40, 7)
    assert all(np.array_equal(np.bincount(groups[r], minlength=3), [2, 4, 1]) for r in rows)
    assert (rows[:, -1] == 6).all()  # a stratum of one sample is in every resample


def test_vectorized_resample_metrics_equal_the_metrics_module():
    rng = np.random.default_rng(2)
    n = 90
    groups = rng.integers(0, 3, n)
    rows = _resample(groups, 30, rng)
    labels = rng.integers(0, 2, n).astype(float)
    score = np.round(labels + rng.normal(size=n), 1)  # tied scores
    time = rng.integers(1, 12, n).astype(float)  # tied times
    survival = np.c_[time, rng.random(n) < 0.6]
    risk = np.round(-time / 4 + rng.normal(size=n), 1)  # tied risks
    np.testing.assert_allclose(_auroc_rows(labels[rows] == 1, score[rows]), [auroc(labels[r], score[r]) for r in rows])
    np.testing.assert_allclose(_r2_rows(time[rows], risk[rows]), [r2(time[r], risk[r]) for r in rows])
    expected = [c_index(survival[r], risk[r], strata=groups[r]) for r in rows]
    np.testing.assert_allclose(_c_index_rows(survival, risk, groups, rows), expected, rtol=1e-12)


def test_survival_strata_give_the_within_stratum_c_index():
    y, risk = synthetic("survival", 120)
    strata = np.repeat(["m1", "m2"], 60)
    risk = risk + np.where(strata == "m2", 5.0, 0.0)  # m2's risks sit on another scale
    stratified = metric_interval("survival", y, risk, strata=strata, n_boot=200)
    assert stratified.estimate == pytest.approx(c_index(y, risk, strata=strata))
    assert stratified.estimate > metric_interval("survival", y, risk, n_boot=200).estimate
    assert stratified.low < stratified.estimate < stratified.high


def test_interval_is_nan_when_most_resamples_are_undefined():
    # only samples 0 and 1 form a comparable pair; a resample holds both about 41% of the time
    survival = np.array([[1.0, 1.0], [2.0, 0.0]] + [[0.5, 0.0]] * 8)
    interval = metric_interval("survival", survival, np.r_[2.0, 1.0, np.zeros(8)], n_boot=400)
    assert interval.estimate == 1.0
    assert math.isnan(interval.low) and math.isnan(interval.high)


def test_non_finite_predictions_give_nan():
    y, prediction = synthetic("regression", 50)
    prediction[3] = np.nan
    interval = metric_interval("regression", y, prediction, n_boot=50)
    assert all(math.isnan(v) for v in (interval.estimate, interval.low, interval.high))


def test_bad_arguments_raise_clear_errors():
    y, prediction = synthetic("binary", 20)
    with pytest.raises(ValueError, match=r"prediction has shape \(19,\) but y_true has 20 samples"):
        metric_interval("binary", y, prediction[:19])
    with pytest.raises(ValueError, match=r"prediction_b has shape \(19,\) but y_true has 20 samples"):
        paired_difference_interval("binary", y, prediction, prediction[:19])
    with pytest.raises(ValueError, match=r"strata has shape \(3,\) but y_true has 20 samples"):
        metric_interval("binary", y, prediction, strata=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'"):
        metric_interval("ordinal", y, prediction)
    with pytest.raises(ValueError, match=r"a survival task needs \(n, 2\) \[time, event\]"):
        metric_interval("survival", y, prediction)
    with pytest.raises(ValueError, match="level is 95"):
        metric_interval("binary", y, prediction, level=95)
    with pytest.raises(ValueError, match="n_boot is 0"):
        metric_interval("binary", y, prediction, n_boot=0)
