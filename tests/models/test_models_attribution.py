from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.attribution import (
    attributions,
    consensus_ranking,
    normalized_scores,
    precision_at_k,
    rank_features,
    ranking_from_vector,
)
from models.data import TaskSpec
from models.network import MultitaskNet
from models.training import LocalTrainer, TrainSettings

PLANTED = ["f0", "f1", "f2"]  # every outcome follows f0 - f1 + 0.5 f2 (see conftest.synthetic_member)
KINDS = ("binary", "regression", "survival")


@pytest.fixture(scope="module")
def trained(member):
    data, tasks = member(n=300, n_features=20, seed=4, kinds=KINDS)
    model = MultitaskNet(data.n_features, tasks, trunk_widths=(16, 8), head_width=8, dropout=0.0, seed=0)
    settings = TrainSettings(epochs=30, batch_size=32, learning_rate=1e-2, patience=5, seed=0)
    LocalTrainer(model, data, tasks, settings=settings).fit()
    return model, data.subset("train")


@pytest.fixture(scope="module")
def tables(trained):
    """Per case: the ranking of the train split (binary with and without labels)."""
    model, train = trained
    names = train.feature_names
    return {
        "binary": rank_features(model, train.X, "binary", feature_names=names, labels=train.targets["binary"]),
        "binary-unlabelled": rank_features(model, train.X, "binary", feature_names=names),
        "regression": rank_features(model, train.X, "regression", feature_names=names),
        "survival": rank_features(model, train.X, "survival", feature_names=names),
    }


@pytest.mark.parametrize("case", ["binary", "binary-unlabelled", "regression", "survival"])
def test_planted_features_rank_on_top(tables, case):
    table = tables[case]
    assert list(table.columns) == ["feature", "score", "direction", "rank"]
    assert table["rank"].tolist() == list(range(1, 21))
    assert table["score"].is_monotonic_decreasing and (table["score"] >= 0).all()
    assert precision_at_k(table, PLANTED) == 1.0
    assert set(table.head(2)["feature"]) == {"f0", "f1"}  # the strongest effects lead


@pytest.mark.parametrize("case", ["binary", "binary-unlabelled", "regression", "survival"])
def test_direction_follows_the_planted_effect(tables, case):
    # f0 raises the logit, the value and the risk (shorter times); f1 lowers them
    direction = tables[case].set_index("feature")["direction"]
    assert direction["f0"] == 1 and direction["f1"] == -1 and direction["f2"] == 1


def test_score_is_the_linearized_attribution_contrast(trained, tables):
    model, train = trained
    labels = train.targets["binary"]
    keep = ~np.isnan(labels)
    x = train.X
    baseline = x.mean(axis=0)
    values = attributions(model, x[keep], "binary", baseline=baseline)
    d = (x[keep] - baseline).astype(np.float64)
    slope = (values * d).sum(axis=0) / (d * d).sum(axis=0)
    positive = labels[keep] == 1
    contrast = slope * (d[positive].mean(axis=0) - d[~positive].mean(axis=0))
    table = tables["binary"].set_index("feature").loc[train.feature_names]
    np.testing.assert_allclose(table["score"], np.abs(contrast), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(table["direction"], np.sign(slope))


def test_rows_without_a_label_are_left_out(trained):
    model, train = trained
    labels = train.targets["binary"]
    keep = ~np.isnan(labels)
    assert 0 < keep.sum() < keep.size
    baseline = train.X.mean(axis=0)  # same reference for both calls
    names = train.feature_names
    full = rank_features(model, train.X, "binary", feature_names=names, labels=labels, baseline=baseline)
    kept = rank_features(model, train.X[keep], "binary", feature_names=names, labels=labels[keep], baseline=baseline)
    pd.testing.assert_frame_equal(full, kept)


def test_one_class_labels_fall_back_to_the_predicted_split(trained, tables, caplog):
    model, train = trained
    one_class = rank_features(model, train.X, "binary", feature_names=train.feature_names, labels=np.ones(180))
    pd.testing.assert_frame_equal(one_class, tables["binary-unlabelled"])
    assert "180 positives and 0 negatives" in caplog.text


def test_a_constant_output_cannot_be_split(member):
    data, tasks = member(n=20, n_features=4, kinds=("survival",))
    model = MultitaskNet(4, tasks, trunk_widths=(4,), head_width=0, dropout=0.0, seed=0)
    with torch.no_grad():
        model.heads["survival"][0].weight.zero_()
    with pytest.raises(ValueError, match="output is the same for all 20 rows of data_X"):
        rank_features(model, data.X, "survival", feature_names=data.feature_names)


def test_bootstrap_frequency_is_stable_and_seeded(trained):
    model, train = trained
    options = dict(feature_names=train.feature_names, labels=train.targets["binary"], n_boot=40, top_k=3)
    table = rank_features(model, train.X, "binary", seed=7, **options)
    assert list(table.columns) == ["feature", "score", "direction", "rank", "frequency"]
    assert table["frequency"].between(0.0, 1.0).all()
    assert table["frequency"].sum() == pytest.approx(3.0)  # each resample has exactly top_k features
    frequency = table.set_index("feature")["frequency"]
    assert frequency[["f0", "f1"]].min() == 1.0 and frequency["f2"] >= 0.9
    pd.testing.assert_frame_equal(table, rank_features(model, train.X, "binary", seed=7, **options))


def test_integrated_gradients_are_complete(trained):
    # sum over features of IG = f(x) - f(baseline), up to the integration error
    model, train = trained
    x = train.X[:25]
    baseline = np.zeros(train.n_features, dtype=np.float32)
    ig = attributions(model, x, "binary", n_steps=64, baseline=baseline)
    with torch.no_grad():
        gap = model.forward_task(torch.from_numpy(x), "binary") - model.forward_task(
            torch.from_numpy(baseline[None]), "binary"
        )
    assert ig.shape == (25, train.n_features) and ig.dtype == np.float64
    assert np.allclose(ig.sum(axis=1), gap.numpy(), atol=0.02 * np.abs(gap.numpy()).max())


def test_a_disconnected_feature_gets_zero_attribution():
    model = MultitaskNet(6, [TaskSpec("t", "binary")], trunk_widths=(8,), head_width=4, dropout=0.2, seed=1)
    with torch.no_grad():
        model.trunk[0].weight[:, 3] = 0.0
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    model.train()
    values = attributions(model, x, "t", n_steps=8)
    assert model.training  # the mode is restored; dropout was off while attributing
    assert values.shape == (10, 6)
    assert np.all(values[:, 3] == 0.0) and np.abs(values[:, 0]).sum() > 0
    np.testing.assert_array_equal(values, attributions(model, x, "t", n_steps=8))


def test_rank_features_checks_its_inputs(trained):
    model, train = trained
    names = train.feature_names
    with pytest.raises(ValueError, match="3 feature names for a model with 20 inputs"):
        rank_features(model, train.X, "binary", feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels of task 'binary' have shape \(5,\); expected \(180,\)"):
        rank_features(model, train.X, "binary", feature_names=names, labels=np.ones(5))
    with pytest.raises(ValueError, match="values other than 0, 1, NaN"):
        rank_features(model, train.X, "binary", feature_names=names, labels=np.full(180, 2.0))
    with pytest.raises(ValueError, match="labels are used for binary tasks only"):
        rank_features(model, train.X, "survival", feature_names=names, labels=np.ones(180))
    with pytest.raises(ValueError, match=r"data_X has shape \(180, 3\); expected \(n_samples, 20\)"):
        rank_features(model, train.X[:, :3], "binary", feature_names=names)
    with pytest.raises(ValueError, match="n_steps=0"):
        attributions(model, train.X, "binary", n_steps=0)
    with pytest.raises(KeyError, match="no head for task 'nope'"):
        rank_features(model, train.X, "nope", feature_names=names)


def test_normalized_scores_are_signed_and_sum_to_one():
    table = pd.DataFrame(
        {"feature": ["x", "y", "z"], "score": [6.0, 3.0, 1.0], "direction": [1, -1, 1], "rank": [1, 2, 3]}
    )
    vector = normalized_scores(table, ["z", "w", "y", "x"])  # another order, and an unranked feature
    np.testing.assert_allclose(vector, [0.1, 0.0, -0.3, 0.6])
    assert np.abs(vector).sum() == pytest.approx(1.0)
    unsigned = normalized_scores(table.drop(columns="direction"), ["x", "y", "z"])
    np.testing.assert_allclose(unsigned, [0.6, 0.3, 0.1])
    with pytest.raises(ValueError, match=r"1 features not in feature_names \(e.g. \['z'\]\)"):
        normalized_scores(table, ["x", "y"])


def test_summed_vectors_turn_back_into_a_ranking():
    names = ["a", "b", "c", "d"]
    one = pd.DataFrame({"feature": names, "score": [4.0, 3.0, 2.0, 1.0], "direction": [1, -1, 1, 1]})
    two = pd.DataFrame({"feature": ["b", "c", "a"], "score": [0.5, 0.4, 0.1], "direction": [-1, -1, 1]})
    total = normalized_scores(one, names) + normalized_scores(two, names)
    table = ranking_from_vector(names, total, frequency=np.array([1.0, 0.5, 0.2, 0.0]))
    assert list(table.columns) == ["feature", "score", "direction", "rank", "frequency"]
    assert table["feature"].tolist() == ["b", "a", "c", "d"]
    np.testing.assert_allclose(table["score"], [0.3 + 0.5, 0.4 + 0.1, 0.4 - 0.2, 0.1])
    assert table["direction"].tolist() == [-1, 1, -1, 1]
    assert table["frequency"].tolist() == [0.5, 1.0, 0.2, 0.0]
    with pytest.raises(ValueError, match=r"signed_scores has shape \(3,\) for 4 feature names"):
        ranking_from_vector(names, total[:3])


def test_consensus_is_the_mean_of_normalized_scores():
    a = pd.DataFrame({"feature": ["x", "y", "z"], "score": [6.0, 3.0, 1.0], "rank": [1, 2, 3]})
    b = pd.DataFrame({"feature": ["y", "x"], "score": [0.3, 0.1], "rank": [1, 2]})  # another scale
    table = consensus_ranking([a, b])
    scores = dict(zip(table["feature"], table["score"], strict=True))
    assert scores["x"] == pytest.approx((0.6 + 0.25) / 2)
    assert scores["y"] == pytest.approx((0.3 + 0.75) / 2)
    assert scores["z"] == pytest.approx(0.1 / 2)
    assert table["feature"].tolist() == ["y", "x", "z"] and table["rank"].tolist() == [1, 2, 3]
    assert (table["direction"] == 0).all()  # tables without a direction say nothing about it
    weighted = consensus_ranking([a, b], weights=[1.0, 0.0])
    assert weighted["feature"].tolist() == ["x", "y", "z"]


def test_consensus_direction_is_the_sign_of_the_weighted_signed_sum():
    a = pd.DataFrame({"feature": ["x", "y"], "score": [3.0, 1.0], "direction": [1, 1]})
    b = pd.DataFrame({"feature": ["x", "y"], "score": [1.0, 1.0], "direction": [-1, -1]})
    table = consensus_ranking([a, b]).set_index("feature")
    assert table.loc["x", "direction"] == 1 and table.loc["y", "direction"] == -1  # 0.75-0.5, 0.25-0.5
    assert table.loc["x", "score"] == pytest.approx((0.75 + 0.5) / 2)
    flipped = consensus_ranking([a, b], weights=[1.0, 3.0]).set_index("feature")
    assert flipped.loc["x", "direction"] == -1
    with pytest.raises(ValueError, match="table 1 lacks columns"):
        consensus_ranking([a, b.drop(columns="score")])


def test_precision_at_k():
    table = pd.DataFrame({"feature": ["a", "b", "c", "d"], "score": [4, 3, 2, 1], "rank": [1, 2, 3, 4]})
    assert precision_at_k(table, ["a", "c"]) == 0.5
    assert precision_at_k(table, ["a", "c"], k=3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="truth is empty"):
        precision_at_k(table, [])
