from __future__ import annotations

import math

import pytest

from models.baselines import train_local, train_pooled
from models.data import TaskSpec
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


def test_pooled_baseline_rejects_a_task_name_used_twice(two_members, small_network):
    members, tasks = two_members
    tasks = {"a": tasks["a"], "b": [TaskSpec("a_binary", "binary")]}
    with pytest.raises(ValueError, match="task 'a_binary' belongs to both 'a' and 'b'"):
        train_pooled(members, tasks, settings=SETTINGS, network=small_network)


def test_unknown_network_options_are_named(two_members):
    members, tasks = two_members
    with pytest.raises(ValueError, match=r"network has unknown keys \['width'\]"):
        train_local(members["a"], tasks["a"], settings=SETTINGS, network={"width": 3})
