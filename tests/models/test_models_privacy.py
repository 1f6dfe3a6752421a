from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from models.attribution import rank_features
from models.data import MemberData, TaskSpec
from models.network import MultitaskNet
from models.privacy import PrivacyBudgetExceeded, PrivacySettings, validate_for_dp
from models.training import LocalTrainer, TrainSettings

SETTINGS = TrainSettings(epochs=1, batch_size=32, learning_rate=1e-2, seed=0)


def private_trainer(member, small_network, *, epsilon=3.0, planned_epochs=4, seed=0):
    data, tasks = member(seed=2)
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=seed)
    privacy = PrivacySettings(epsilon=epsilon, delta=1e-3, max_grad_norm=1.0)
    return LocalTrainer(model, data, tasks, settings=SETTINGS, privacy=privacy, planned_epochs=planned_epochs)


def test_network_passes_opacus_strict_validation(member, small_network):
    data, tasks = member()
    model = MultitaskNet(data.n_features, tasks, trunk_widths=(32, 16), head_width=8, dropout=0.2)
    assert ModuleValidator.validate(model, strict=True) == []


def test_budget_spent_over_the_whole_plan_and_not_beyond(member, small_network):
    trainer = private_trainer(member, small_network, epsilon=3.0, planned_epochs=4)
    assert trainer.epsilon_spent() == 0.0
    server = MultitaskNet(trainer.data.n_features, trainer.tasks, **small_network, seed=7)
    spent = []
    for _ in range(2):  # two federated rounds of two local epochs
        trainer.model.load_trunk_state(server.trunk_state())
        stats = trainer.train(epochs=2)
        assert math.isfinite(stats.loss)
        spent.append(trainer.epsilon_spent())
    assert 0 < spent[0] < spent[1] <= 3.0 + 0.05
    assert spent[1] > 2.5  # the noise was calibrated for all four epochs, not for one round
    with pytest.raises(PrivacyBudgetExceeded, match="planned for 4 epochs; 4 are done and 1 more were requested"):
        trainer.train(epochs=1)
    assert trainer.epochs_done == 4


def test_the_exchanged_model_is_the_unwrapped_network(member, small_network):
    trainer = private_trainer(member, small_network)
    model = trainer.model
    trainer.train(epochs=1)
    assert type(trainer.model) is MultitaskNet and trainer.model is model
    assert all(k.startswith("trunk.") for k in trainer.model.trunk_state())
    assert trainer.noise_multiplier > 0


def test_attribution_and_training_alternate_under_dp(member, small_network):
    # a site ranks biomarkers with the raw model while Opacus' hooks sit on its layers
    trainer = private_trainer(member, small_network, planned_epochs=3)
    trainer.train(epochs=1)
    x = trainer.data.subset("train").X
    first = rank_features(trainer.model, x, "binary", feature_names=trainer.data.feature_names, n_steps=4)
    assert len(first) == trainer.data.n_features and first["score"].ge(0).all() and first["score"].gt(0).any()
    stats = trainer.train(epochs=1)
    assert math.isfinite(stats.loss)
    assert all(math.isfinite(v) for v in trainer.evaluate("val")["regression"].values())


def test_private_training_is_deterministic_for_a_seed(member, small_network):
    a = private_trainer(member, small_network)
    b = private_trainer(member, small_network)
    a.train(epochs=1)
    b.train(epochs=1)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_poisson_sampling_with_empty_and_label_free_batches():
    rng = np.random.default_rng(0)
    n = 12
    labels = np.full(n, np.nan)
    labels[:3] = [0.0, 1.0, 1.0]  # most batches hold no label at all
    data = MemberData(X=rng.normal(size=(n, 4)), targets={"b": labels}, split=np.array(["train"] * n))
    tasks = [TaskSpec("b", "binary")]
    model = MultitaskNet(4, tasks, trunk_widths=(8,), head_width=0, dropout=0.0, seed=0)
    settings = TrainSettings(batch_size=1, seed=3)  # sample rate 1/12: many empty batches
    privacy = PrivacySettings(epsilon=5.0, delta=1e-2)
    trainer = LocalTrainer(model, data, tasks, settings=settings, privacy=privacy, planned_epochs=3)
    stats = trainer.train(epochs=3)
    assert stats.steps == 3 * n  # every Poisson draw is a step (and accounted), empty or not
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 < trainer.epsilon_spent() <= 5.05


def test_private_training_needs_a_plan(member, small_network):
    with pytest.raises(ValueError, match="planned_epochs=None; DP-SGD needs the whole plan"):
        private_trainer(member, small_network, planned_epochs=None)


def test_batchnorm_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="Use LayerNorm instead of BatchNorm"):
        validate_for_dp(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0, "delta": 1e-5}, "epsilon=0.0"),
        ({"epsilon": 1.0, "delta": 1.5}, "delta=1.5"),
        ({"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 0}, "max_grad_norm=0"),
        ({"epsilon": 1.0, "delta": 1e-5, "accountant": "moments"}, "accountant='moments'"),
    ],
)
def test_privacy_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacySettings(**kwargs)


def test_no_privacy_reports_no_epsilon(member, small_network):
    data, tasks = member()
    model = MultitaskNet(data.n_features, tasks, **small_network, seed=0)
    trainer = LocalTrainer(model, data, tasks, settings=SETTINGS)
    assert trainer.epsilon_spent() is None and trainer.noise_multiplier is None
