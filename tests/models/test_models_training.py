from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.data import TaskSpec
from models.network import MultitaskNet
from models.training import LocalTrainer, TrainSettings


def make_trainer(member, small_network, *, seed=0, model_seed=0, **settings):
    data, tasks = member(seed=1)
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=model_seed)
    options = {"epochs": 2, "batch_size": 32, "learning_rate": 1e-2, "seed": seed} | settings
    return LocalTrainer(model, data, tasks, settings=TrainSettings(**options))


def test_same_seed_gives_the_same_weights(member, small_network):
    small_network["dropout"] = 0.3  # dropout must be seeded too
    a = make_trainer(member, small_network)
    b = make_trainer(member, small_network)
    c = make_trainer(member, small_network, seed=1)
    for trainer in (a, b, c):
        trainer.train(epochs=2)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not torch.equal(a.model.trunk[0].weight, c.model.trunk[0].weight)


def test_training_leaves_the_global_rng_alone(member, small_network):
    trainer = make_trainer(member, small_network)
    state = torch.get_rng_state()
    trainer.train(epochs=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_two_calls_continue_one_stream(member, small_network):
    once = make_trainer(member, small_network)
    twice = make_trainer(member, small_network)
    once.train(epochs=2)
    twice.train(epochs=1)
    twice.train(epochs=1)
    assert torch.allclose(once.model.trunk[0].weight, twice.model.trunk[0].weight, atol=1e-6)


def test_train_reports_steps_and_loss(member, small_network):
    trainer = make_trainer(member, small_network, batch_size=50)
    stats = trainer.train(epochs=3)
    assert stats.steps == 3 * math.ceil(120 / 50)  # 120 train rows
    assert math.isfinite(stats.loss) and stats.loss > 0 and stats.seconds >= 0
    assert trainer.epochs_done == 3


def test_federated_rounds_keep_one_optimizer_and_the_raw_model(member, small_network):
    trainer = make_trainer(member, small_network)
    optimizer, model = trainer.optimizer, trainer.model
    server = MultitaskNet(trainer.data.n_features, trainer.tasks, **small_network, seed=9)
    for _ in range(2):
        trainer.model.load_trunk_state(server.trunk_state())
        assert torch.equal(trainer.model.trunk[0].weight, server.trunk[0].weight)
        trainer.train(epochs=1)
    assert trainer.optimizer is optimizer and trainer.model is model
    assert optimizer.state[model.trunk[0].weight]["step"].item() == 2 * math.ceil(120 / 32)


def test_regression_targets_standardized_with_train_statistics(member, small_network):
    trainer = make_trainer(member, small_network)
    y = trainer.data.subset("train").targets["regression"]
    mean, scale = trainer.model.target_scaling("regression")
    assert mean == pytest.approx(np.nanmean(y)) and scale == pytest.approx(np.nanstd(y))
    assert mean > 5  # the planted targets are centered near 10, so scaling matters


def test_fit_learns_the_planted_signal_and_keeps_the_best_epoch(member, small_network):
    trainer = make_trainer(member, small_network, epochs=25, patience=4)
    result = trainer.fit()
    assert 1 <= result.best_epoch <= result.epochs <= 25
    assert trainer.validation_loss() == pytest.approx(result.best_val_loss, rel=1e-5)
    metrics = trainer.evaluate("test")
    assert metrics["binary"]["auroc"] > 0.85
    assert metrics["regression"]["r2"] > 0.6
    assert metrics["survival"]["c_index"] > 0.7


def test_settings_are_keyword_only_and_validated():
    with pytest.raises(TypeError):
        TrainSettings(3)  # type: ignore[misc]
    with pytest.raises(ValueError, match="TrainSettings.batch_size=0"):
        TrainSettings(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate=-1"):
        TrainSettings(learning_rate=-1)


def test_tasks_must_match_the_heads(member, small_network):
    data, tasks = member(seed=1)
    model = MultitaskNet(data.n_features, tasks[:1], **small_network, seed=0)
    with pytest.raises(ValueError, match="differ from the model's heads"):
        LocalTrainer(model, data, tasks, settings=TrainSettings())


def test_survival_targets_must_have_two_columns(member, small_network):
    data, _ = member(seed=1, kinds=("binary",))
    tasks = [TaskSpec("binary", "survival")]
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
    with pytest.raises(ValueError, match=r"survival task 'binary' have shape \(200,\); expected \(200, 2\)"):
        LocalTrainer(model, data, tasks, settings=TrainSettings())


def test_label_values_are_checked(member, small_network):
    data, tasks = member(seed=1)
    data.targets["binary"][0] = 2.0
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
    with pytest.raises(ValueError, match=r"binary task 'binary' has labels \[2.0\]; use 0/1"):
        LocalTrainer(model, data, tasks, settings=TrainSettings())
    data, tasks = member(seed=1)
    data.targets["survival"][0] = [-1.0, 1.0]
    with pytest.raises(ValueError, match="negative times"):
        LocalTrainer(model, data, tasks, settings=TrainSettings())
    data, tasks = member(seed=1)
    data.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="X holds 1 NaN/inf values"):
        LocalTrainer(model, data, tasks, settings=TrainSettings())


def test_fit_without_validation_rows_trains_all_epochs(member, small_network):
    data, tasks = member(seed=1)
    data.split[data.split == "val"] = "train"
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
    trainer = LocalTrainer(model, data, tasks, settings=TrainSettings(epochs=3, patience=1))
    result = trainer.fit()
    assert result.epochs == 3 and result.best_epoch == 3 and math.isnan(result.best_val_loss)
    metrics = trainer.evaluate("val")
    assert all(math.isnan(v) for task in metrics.values() for v in task.values())


def test_fedavg_round_trip_between_members_and_the_server_trunk(member, small_network):
    # the contract the FLARE job relies on, without FLARE: trunk-only states in and out
    from models.network import SharedTrunk

    server = SharedTrunk(12, trunk_widths=small_network["trunk_widths"], dropout=0.0, seed=0)
    trainers = []
    for seed, prefix in ((1, "a_"), (2, "b_")):
        data, tasks = member(seed=seed, prefix=prefix)
        model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
        trainers.append(LocalTrainer(model, data, tasks, settings=TrainSettings(epochs=1, seed=seed)))
    heads = [t.model.head_state() for t in trainers]
    for _ in range(2):
        updates = []
        for trainer in trainers:
            trainer.model.load_trunk_state(server.state_dict())
            trainer.train()
            updates.append(trainer.model.trunk_state())
        assert all(set(u) == set(server.state_dict()) for u in updates)
        server.load_state_dict({k: sum(u[k] for u in updates) / len(updates) for k in updates[0]})
    for trainer, before in zip(trainers, heads, strict=True):  # heads trained locally, never averaged
        weights = [k for k in before if k.endswith(".0.weight")]
        assert len(weights) == 3
        assert not any(torch.equal(trainer.model.head_state()[k], before[k]) for k in weights)
    expected = (updates[0]["trunk.0.weight"] + updates[1]["trunk.0.weight"]) / 2
    assert torch.allclose(server.trunk[0].weight, expected)
