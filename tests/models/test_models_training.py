from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.data import TaskSpec
from models.network import MultitaskNet, SharedModel
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
    assert len(result.scores) == result.epochs
    # the selected epoch is the one with the best recorded validation score, and its weights are kept
    assert result.best_epoch == int(np.argmax(result.scores)) + 1
    assert result.best_score == max(result.scores)
    assert trainer.validation_score() == pytest.approx(result.best_score, rel=1e-9)
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
    assert math.isnan(result.best_score) and math.isnan(trainer.validation_score())
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


# -- epoch selection -------------------------------------------------------------------------------


class ScriptedTrainer(LocalTrainer):
    """Reports scripted validation scores and losses, and snapshots the weights of every epoch."""

    def __init__(self, *args, scores, losses=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = list(scores)
        self.losses = losses
        self.snapshots: list[torch.Tensor] = []

    def validation_score(self) -> float:
        if len(self.snapshots) < self.epochs_done:  # the call fit makes after each epoch
            self.snapshots.append(self.model.trunk[0].weight.detach().clone())
        return self.script[min(self.epochs_done, len(self.script)) - 1]

    def validation_loss(self) -> float:
        return float("nan") if self.losses is None else self.losses[self.epochs_done - 1]


def scripted(member, small_network, *, patience, **kwargs) -> ScriptedTrainer:
    data, tasks = member(seed=1)
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
    settings = TrainSettings(epochs=8, batch_size=32, learning_rate=1e-2, patience=patience)
    return ScriptedTrainer(model, data, tasks, settings=settings, **kwargs)


def test_fit_selects_on_the_score_not_on_a_rising_validation_loss(member, small_network):
    # overconfidence: the loss rises from epoch 2 while the ranking (the score) still improves
    scores = [0.60, 0.70, 0.75, 0.80, 0.82, 0.83, 0.84, 0.85]
    losses = [1.00, 0.90, 1.10, 1.30, 1.50, 1.70, 1.90, 2.10]
    trainer = scripted(member, small_network, patience=2, scores=scores, losses=losses)
    result = trainer.fit()
    assert result.epochs == 8 and result.best_epoch == 8 and result.best_score == 0.85
    assert result.scores == tuple(scores)


def test_fit_stops_after_patience_and_restores_the_best_epoch(member, small_network):
    scores = [0.60, 0.70, 0.65, 0.80, 0.80, 0.79, 0.90, 0.95]  # 0.80 again is no improvement
    trainer = scripted(member, small_network, patience=2, scores=scores)
    result = trainer.fit()
    assert result.epochs == 6 and result.best_epoch == 4 and result.best_score == 0.80
    assert trainer.epochs_done == 6
    assert torch.equal(trainer.model.trunk[0].weight, trainer.snapshots[3])
    assert not torch.equal(trainer.model.trunk[0].weight, trainer.snapshots[5])


def test_undefined_scores_never_win_and_do_not_stop_training(member, small_network):
    nan = float("nan")
    trainer = scripted(member, small_network, patience=2, scores=[nan, nan, 0.7, nan, 0.6])
    result = trainer.fit(5)
    assert result.epochs == 5 and result.best_epoch == 3 and result.best_score == 0.7


def test_fit_without_selection_trains_exactly_max_epochs(member, small_network):
    trainer = scripted(member, small_network, patience=1, scores=[0.9, 0.1, 0.1, 0.1])
    result = trainer.fit(4, select=False)
    assert result.epochs == 4 and result.best_epoch == 4 and result.scores == ()
    assert trainer.epochs_done == 4 and result.best_score == 0.1  # the last weights, scored
    with pytest.raises(TypeError):
        trainer.fit(4, False)  # type: ignore[misc]


def test_the_score_outlasts_the_loss_minimum_on_a_real_member(member, small_network):
    # On this member the summed validation loss (Cox-dominated) bottoms out early and then rises
    # from overconfidence while AUROC and C-index keep improving: the score rule trains on.
    data, tasks = member(seed=2, kinds=("binary", "survival"))
    settings = TrainSettings(epochs=30, batch_size=32, learning_rate=1e-2, patience=5, seed=0)

    def trainer() -> LocalTrainer:
        model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
        return LocalTrainer(model, data, tasks, settings=settings)

    probe, losses, scores = trainer(), [], []
    for _ in range(12):
        probe.train(epochs=1)
        losses.append(probe.validation_loss())
        scores.append(probe.validation_score())
    loss_epoch = int(np.argmin(losses)) + 1
    result = trainer().fit()
    assert result.best_epoch > loss_epoch
    assert result.best_score > scores[loss_epoch - 1] + 0.02
    assert result.scores[:12] == pytest.approx(scores)


def test_validation_score_is_the_mean_primary_metric_of_tasks_with_labels(member, small_network):
    trainer = make_trainer(member, small_network)
    trainer.data.targets["regression"][trainer.data.split == "val"] = np.nan  # no val labels: left out
    trainer = LocalTrainer(trainer.model, trainer.data, trainer.tasks, settings=trainer.settings)
    trainer.train(epochs=1)
    val = trainer.evaluate("val")
    expected = (val["binary"]["auroc"] + val["survival"]["c_index"]) / 2
    assert trainer.validation_score() == pytest.approx(expected)


def test_fedavg_round_trip_with_a_shared_endpoint(member, small_network):
    # two members hold "os" (a shared endpoint) and one private task each; the server averages the
    # trunk and the "os" head, the private heads and every target scaling stay at the members
    server = SharedModel(12, shared_tasks=["os"], **small_network, seed=0)
    trainers = []
    for seed, private in ((1, "a_resp"), (2, "b_level")):
        data, _ = member(seed=seed, kinds=("survival", "binary" if private == "a_resp" else "regression"))
        data.targets = {"os": data.targets["survival"], private: data.targets[list(data.targets)[1]]}
        kind = "binary" if private == "a_resp" else "regression"
        tasks = [TaskSpec("os", "survival", shared=True), TaskSpec(private, kind)]
        model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
        trainers.append(LocalTrainer(model, data, tasks, settings=TrainSettings(epochs=1, seed=seed)))
    scaling = trainers[1].model.target_scaling("b_level")
    for _ in range(2):
        updates = []
        for trainer in trainers:
            trainer.model.load_shared_state(server.state_dict())
            trainer.train()
            updates.append(trainer.model.shared_state())
        assert all(u.keys() == server.state_dict().keys() for u in updates)
        assert not any("a_resp" in k or "b_level" in k or "target" in k for u in updates for k in u)
        server.load_state_dict({k: sum(u[k] for u in updates) / len(updates) for k in updates[0]})
    expected = (updates[0]["heads.os.0.weight"] + updates[1]["heads.os.0.weight"]) / 2
    assert torch.allclose(server.heads["os"][0].weight, expected)
    assert trainers[1].model.target_scaling("b_level") == scaling
