from __future__ import annotations

import math

import numpy as np
import pytest

from models.baselines import train_local, train_pooled
from models.data import MemberData, TaskSpec, merge_tasks, pool_members
from models.metrics import auroc, c_index
from models.training import TrainSettings

SETTINGS = TrainSettings(epochs=15, batch_size=32, learning_rate=1e-2, patience=3, seed=0)


@pytest.fixture
def two_members(member):
    a, tasks_a = member(n=150, seed=10, kinds=("binary", "regression"), prefix="a_")
    b, tasks_b = member(n=120, seed=11, kinds=("survival",), prefix="b_")
    return {"a": a, "b": b}, {"a": tasks_a, "b": tasks_b}


def test_local_baseline_fits_and_scores_one_member(two_members, small_network):
    members, tasks = two_members
    result = train_local(members["a"], tasks["a"], settings=SETTINGS, network=small_network)
    assert set(result.metrics) == {"a_binary", "a_regression"}
    assert result.metrics["a_binary"]["auroc"] > 0.8
    assert result.metrics["a_regression"]["r2"] > 0.5
    assert set(result.model.heads) == {"a_binary", "a_regression"}


def test_pooled_baseline_scores_each_member_on_its_own_tasks(two_members, small_network):
    members, tasks = two_members
    result = train_pooled(members, tasks, settings=SETTINGS, network=small_network)
    assert set(result.metrics) == {"a", "b"}
    assert set(result.metrics["a"]) == {"a_binary", "a_regression"}
    assert set(result.metrics["b"]) == {"b_survival"}
    assert set(result.model.heads) == {"a_binary", "a_regression", "b_survival"}
    values = [v for member in result.metrics.values() for task in member.values() for v in task.values()]
    assert all(math.isfinite(v) for v in values)
    assert result.metrics["b"]["b_survival"]["c_index"] > 0.65
    assert result.model.shared_tasks == [] and result.fit.best_epoch == int(np.argmax(result.fit.scores)) + 1


@pytest.fixture
def shared_members(member):
    """'a' and 'b' both hold overall survival ('os', a shared endpoint); 'a' also a private task."""
    a, _ = member(n=150, seed=10, kinds=("binary", "survival"))
    b, _ = member(n=120, seed=11, kinds=("survival",))
    a.targets = {"a_resp": a.targets["binary"], "os": a.targets["survival"]}
    b.targets = {"os": b.targets["survival"]}
    tasks = {
        "a": [TaskSpec("a_resp", "binary"), TaskSpec("os", "survival", shared=True)],
        "b": [TaskSpec("os", "survival", shared=True)],
    }
    return {"a": a, "b": b}, tasks


def test_pool_members_gives_a_shared_endpoint_one_target(shared_members):
    members, tasks = shared_members
    pooled = pool_members(members, tasks)
    assert pooled.X.shape == (270, 12) and set(pooled.targets) == {"a_resp", "os"}
    np.testing.assert_array_equal(pooled.targets["os"], np.r_[members["a"].targets["os"], members["b"].targets["os"]])
    np.testing.assert_array_equal(pooled.targets["a_resp"][:150], members["a"].targets["a_resp"])
    assert np.isnan(pooled.targets["a_resp"][150:]).all()  # 'b' does not hold it
    assert list(pooled.split) == list(members["a"].split) + list(members["b"].split)


def test_pool_members_uses_only_the_tasks_a_member_holds(shared_members):
    members, tasks = shared_members
    pooled = pool_members(members, {"a": tasks["a"][:1], "b": tasks["b"]})  # 'a' does not declare 'os'
    assert np.isnan(pooled.targets["os"][:150]).all()
    assert not np.isnan(pooled.targets["os"][150:]).all()


def test_merge_tasks_marks_endpoints_held_by_several_members_shared():
    tasks = {"a": [TaskSpec("os", "survival", 1.0), TaskSpec("r", "binary")], "b": [TaskSpec("os", "survival", 3.0)]}
    assert merge_tasks(tasks) == [TaskSpec("os", "survival", 2.0, shared=True), TaskSpec("r", "binary")]


def test_one_endpoint_name_with_two_kinds_names_both_members(shared_members, small_network):
    members, tasks = shared_members
    tasks = {"a": tasks["a"], "b": [TaskSpec("os", "regression")]}
    message = "task 'os' is survival at member 'a' but regression at member 'b'; .*make the kinds agree"
    with pytest.raises(ValueError, match=message):
        pool_members(members, tasks)
    with pytest.raises(ValueError, match=message):
        train_pooled(members, tasks, settings=SETTINGS, network=small_network)


def test_pool_members_rejects_different_panels(shared_members):
    members, tasks = shared_members
    b = members["b"]
    renamed = MemberData(X=b.X, targets=b.targets, split=b.split, feature_names=[f"g{i}" for i in range(12)])
    with pytest.raises(ValueError, match="members 'a' and 'b' have different feature names; harmonize"):
        pool_members({"a": members["a"], "b": renamed}, tasks)


def test_pooled_baseline_trains_one_head_per_shared_endpoint(shared_members, small_network):
    members, tasks = shared_members
    result = train_pooled(members, tasks, settings=SETTINGS, network=small_network)
    assert set(result.model.heads) == {"a_resp", "os"}
    assert result.model.shared_tasks == ["os"]
    assert set(result.metrics["a"]) == {"a_resp", "os"} and set(result.metrics["b"]) == {"os"}
    assert result.metrics["b"]["os"]["c_index"] > 0.65
    # predictions and labels of each member's own test rows, in order; they reproduce the metrics
    for name, data in members.items():
        test = data.subset("test")
        for task, prediction in result.predictions[name].items():
            assert prediction.shape == (test.X.shape[0],)
            np.testing.assert_array_equal(result.test_targets[name][task], test.targets[task])
    recomputed = c_index(result.test_targets["b"]["os"], result.predictions["b"]["os"])
    assert recomputed == result.metrics["b"]["os"]["c_index"]


def test_local_baseline_returns_test_predictions_and_can_train_without_selection(two_members, small_network):
    members, tasks = two_members
    result = train_local(members["a"], tasks["a"], settings=SETTINGS, network=small_network, select=False, max_epochs=4)
    assert result.fit.epochs == 4 and result.fit.best_epoch == 4 and result.fit.scores == ()
    test = members["a"].subset("test")
    assert set(result.predictions) == set(result.test_targets) == {"a_binary", "a_regression"}
    np.testing.assert_array_equal(result.test_targets["a_binary"], test.targets["a_binary"])
    score = auroc(result.test_targets["a_binary"], result.predictions["a_binary"])
    assert score == result.metrics["a_binary"]["auroc"]


def test_unknown_network_options_are_named(two_members):
    members, tasks = two_members
    with pytest.raises(ValueError, match=r"network has unknown keys \['width'\]"):
        train_local(members["a"], tasks["a"], settings=SETTINGS, network={"width": 3})
