"""The last round's attribution is bounded: a seeded draw of at most ``max_per_group`` rows per group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import models.attribution as attribution
from models.data import TaskSpec
from models.network import MultitaskNet


@pytest.fixture(scope="module")
def model_and_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 12)).astype(np.float32)
    labels = (rng.random(120) < 0.25).astype(np.float64)  # 30-ish positives, 90-ish negatives
    labels[:5] = np.nan
    model = MultitaskNet(12, [TaskSpec("r", "binary")], trunk_widths=(16,), head_width=8, seed=0)
    return model, X, labels


def _rank(model, X, labels, **kwargs) -> pd.DataFrame:
    names = [f"g{i}" for i in range(X.shape[1])]
    return attribution.rank_features(model, X, "r", feature_names=names, labels=labels, n_steps=4, **kwargs)


def test_a_bound_above_both_groups_changes_nothing(model_and_data):
    model, X, labels = model_and_data
    pd.testing.assert_frame_equal(_rank(model, X, labels), _rank(model, X, labels, max_per_group=1000))


def test_each_group_is_drawn_down_to_the_bound(model_and_data, monkeypatch):
    model, X, labels = model_and_data
    seen = []
    real = attribution.attributions

    def recording(model_, rows, task, **kwargs):
        seen.append(rows.shape[0])
        return real(model_, rows, task, **kwargs)

    monkeypatch.setattr(attribution, "attributions", recording)
    positives = int(np.nansum(labels))
    _rank(model, X, labels, max_per_group=20)
    assert seen == [20 + min(positives, 20)]
    first = _rank(model, X, labels, max_per_group=20, seed=3)
    assert first.equals(_rank(model, X, labels, max_per_group=20, seed=3))  # the draw is seeded


def test_a_bound_below_two_is_refused(model_and_data):
    model, X, labels = model_and_data
    with pytest.raises(ValueError, match="max_per_group=1; use at least 2"):
        _rank(model, X, labels, max_per_group=1)
