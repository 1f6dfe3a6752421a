"""Endpoint figures of a shared endpoint are within members: member differences alone earn nothing."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.comparison import ArmPredictions, endpoint_figures, member_figures
from models.metrics import auroc, r2

MEANS = {"a": -3.0, "b": 0.0, "c": 3.0}
PREVALENCE = {"a": 0.1, "b": 0.5, "c": 0.9}


def _member_mean_arms(seed: int = 0) -> ArmPredictions:
    """Three members whose labels differ by member; 'federated' predicts only each member's mean, 'local'
    the signal within it."""
    rng = np.random.default_rng(seed)
    arms = ArmPredictions()
    for member in MEANS:
        signal = rng.normal(size=200)
        marker = MEANS[member] + signal + rng.normal(scale=0.5, size=200)
        response = (rng.random(200) < PREVALENCE[member]).astype(float)
        arms.targets[member] = {"marker": marker, "response": response}
        arms.add(
            "federated", member, {"marker": np.full(200, MEANS[member]), "response": np.full(200, PREVALENCE[member])}
        )
        arms.add("local", member, {"marker": MEANS[member] + signal, "response": response + rng.normal(size=200)})
    return arms


@pytest.fixture(scope="module")
def figures():
    arms = _member_mean_arms()
    holders = {"marker": list(MEANS), "response": list(MEANS)}
    return arms, endpoint_figures(arms, kinds={"marker": "regression", "response": "binary"}, holders=holders, seed=0)


def test_member_means_alone_score_near_the_within_member_value_not_the_pooled_one(figures):
    arms, out = figures
    marker, response = out["marker"], out["response"]
    within_r2 = np.mean([r2(arms.targets[m]["marker"], arms.predictions["federated"][m]["marker"]) for m in MEANS])
    assert abs(marker["federated"] - within_r2) < 1e-9 and abs(marker["federated"]) < 0.05
    assert marker["pooled_samples"]["federated"] > 0.8  # what the pooled-sample R2 claimed
    assert response["federated"] == pytest.approx(0.5)  # a constant within each member ranks nobody
    assert response["pooled_samples"]["federated"] > 0.8
    low, high = marker["ci"]["federated"]
    assert low <= marker["federated"] <= high and high < 0.1
    assert marker["n"] == 600


def test_within_member_figure_weights_members_by_their_samples():
    arms = _member_mean_arms(seed=1)
    arms.targets["c"]["response"] = arms.targets["c"]["response"][:50]
    arms.predictions["local"]["c"]["response"] = arms.predictions["local"]["c"]["response"][:50]
    arms.predictions["federated"]["c"]["response"] = arms.predictions["federated"]["c"]["response"][:50]
    out = endpoint_figures(arms, kinds={"response": "binary"}, holders={"response": list(MEANS)}, seed=0)
    each = {m: auroc(arms.targets[m]["response"], arms.predictions["local"][m]["response"]) for m in MEANS}
    expected = (200 * each["a"] + 200 * each["b"] + 50 * each["c"]) / 450
    assert out["response"]["local"] == pytest.approx(expected)


def test_a_loss_beyond_the_interval_is_marked_as_a_loss(figures):
    _, out = figures
    for name in ("marker", "response"):
        diff = out[name]["difference"]["federated-local"]
        assert diff["ci"][1] < 0 and diff["loss"] and not diff["gain"]
    arms = _member_mean_arms()
    member = member_figures(arms, kinds={"marker": "regression", "response": "binary"}, seed=0)
    assert member["a"]["marker"]["difference"]["federated-local"]["loss"]


def test_a_member_whose_metric_is_undefined_is_left_out_and_named():
    rng = np.random.default_rng(0)
    arms = ArmPredictions()
    for member, y in (("a", (rng.random(50) < 0.5).astype(float)), ("b", np.zeros(30))):
        arms.targets[member] = {"r": y}
        arms.add("federated", member, {"r": rng.normal(size=len(y))})
    out = endpoint_figures(arms, kinds={"r": "binary"}, holders={"r": ["a", "b"]}, seed=0)["r"]
    assert out["members_left_out"] == ["b"] and out["n"] == 50
    assert out["federated"] == pytest.approx(auroc(arms.targets["a"]["r"], arms.predictions["federated"]["a"]["r"]))
