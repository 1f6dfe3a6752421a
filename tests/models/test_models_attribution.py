from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.attribution import attributions, consensus_ranking, precision_at_k, rank_features
from models.data import TaskSpec
from models.network import MultitaskNet
from models.training import LocalTrainer, TrainSettings

PLANTED = ["f0", "f1", "f2"]


@pytest.fixture(scope="module")
def trained(member):
    data, tasks = member(n=300, n_features=20, seed=4, kinds=("binary", "survival"))
    model = MultitaskNet(data.n_features, tasks, trunk_widths=(16, 8), head_width=8, dropout=0.0, seed=0)
    settings = TrainSettings(epochs=30, batch_size=32, learning_rate=1e-2, patience=5, seed=0)
    LocalTrainer(model, data, tasks, settings=settings).fit()
    return model, data


@pytest.mark.parametrize("task", ["binary", "survival"])
def test_planted_features_rank_on_top(trained, task):
    model, data = trained
    table = rank_features(model, data.subset("train").X, task, feature_names=data.feature_names)
    assert list(table.columns) == ["feature", "score", "rank"]
    assert table["rank"].tolist() == list(range(1, 21))
    assert table["score"].is_monotonic_decreasing
    assert precision_at_k(table, PLANTED) == 1.0
    assert set(table.head(2)["feature"]) == {"f0", "f1"}  # the strongest effects lead


def test_integrated_gradients_are_complete(trained):
    # sum over features of IG = f(x) - f(baseline), up to the integration error
    model, data = trained
    x = data.X[:25]
    baseline = np.zeros(data.n_features, dtype=np.float32)
    ig = attributions(model, x, "binary", steps=128, baseline=baseline)
    model.eval()
    with torch.no_grad():
        gap = model.forward_task(torch.from_numpy(x), "binary") - model.forward_task(
            torch.from_numpy(baseline[None]), "binary"
        )
    model.train()
    assert np.allclose(ig.sum(axis=1), gap.numpy(), atol=0.02 * np.abs(gap.numpy()).max())


def test_a_disconnected_feature_gets_zero_attribution():
    model = MultitaskNet(6, [TaskSpec("t", "binary")], trunk_widths=(8,), head_width=4, dropout=0.0, seed=1)
    with torch.no_grad():
        model.trunk[0].weight[:, 3] = 0.0
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    for method in ("integrated_gradients", "gradient_x_input"):
        values = attributions(model, x, "t", method=method)
        assert values.shape == (10, 6)
        assert np.all(values[:, 3] == 0.0) and np.abs(values[:, 0]).sum() > 0


def test_rank_features_checks_its_inputs(trained):
    model, data = trained
    with pytest.raises(ValueError, match="3 feature names for a model with 20 inputs"):
        rank_features(model, data.X, "binary", feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="method='shap'"):
        rank_features(model, data.X, "binary", feature_names=data.feature_names, method="shap")
    with pytest.raises(KeyError, match="no head for task 'nope'"):
        rank_features(model, data.X, "nope", feature_names=data.feature_names)


def test_consensus_is_the_mean_of_normalized_scores():
    a = pd.DataFrame({"feature": ["x", "y", "z"], "score": [6.0, 3.0, 1.0], "rank": [1, 2, 3]})
    b = pd.DataFrame({"feature": ["y", "x"], "score": [0.3, 0.1], "rank": [1, 2]})  # another scale
    table = consensus_ranking([a, b])
    scores = dict(zip(table["feature"], table["score"], strict=True))
    assert scores["x"] == pytest.approx((0.6 + 0.25) / 2)
    assert scores["y"] == pytest.approx((0.3 + 0.75) / 2)
    assert scores["z"] == pytest.approx(0.1 / 2)
    assert table["feature"].tolist() == ["y", "x", "z"] and table["rank"].tolist() == [1, 2, 3]
    weighted = consensus_ranking([a, b], weights=[1.0, 0.0])
    assert weighted["feature"].tolist() == ["x", "y", "z"]


def test_precision_at_k():
    table = pd.DataFrame({"feature": ["a", "b", "c", "d"], "score": [4, 3, 2, 1], "rank": [1, 2, 3, 4]})
    assert precision_at_k(table, ["a", "c"]) == 0.5
    assert precision_at_k(table, ["a", "c"], k=3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="truth is empty"):
        precision_at_k(table, [])
