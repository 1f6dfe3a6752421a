"""Split-conformal intervals and sets (MAPIE) around predictions computed beforehand."""

from __future__ import annotations

import numpy as np
import pytest

from models.conformal import calibrate


def test_regression_intervals_cover_new_samples_at_the_stated_level():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=3000)
    truth = predicted + rng.normal(scale=0.5, size=3000)
    truth[:40] = np.nan  # unlabelled calibration samples are skipped
    conformal = calibrate("regression", predicted[:1000], truth[:1000], level=0.9)
    assert conformal.n_calibration == 960
    low, high = conformal.interval(predicted[1000:])
    # absolute residuals of N(0, 0.5): the half-width is about 1.645 * 0.5
    assert np.median(high - low) / 2 == pytest.approx(0.82, abs=0.06)
    assert 0.88 <= conformal.covers(predicted[1000:], truth[1000:]).mean() <= 0.92


def test_binary_sets_hold_the_label_at_the_stated_level():
    rng = np.random.default_rng(1)
    probability = rng.random(3000)
    label = (rng.random(3000) < probability).astype(float)
    conformal = calibrate("binary", probability[:1000], label[:1000], level=0.9)
    sets = conformal.prediction_set(np.array([0.02, 0.5, 0.98]))
    assert sets.tolist() == [[True, False], [True, True], [False, True]]
    assert 0.88 <= conformal.covers(probability[1000:], label[1000:]).mean() <= 0.92


def test_no_calibration_for_survival_or_too_few_labels():
    assert calibrate("survival", np.zeros(50), np.zeros(50)) is None
    assert calibrate("regression", np.zeros(9), np.zeros(9)) is None
    with pytest.raises(ValueError, match="give a coverage between 0 and 1"):
        calibrate("regression", np.zeros(50), np.zeros(50), level=90)
