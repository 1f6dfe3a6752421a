from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.data import TaskSpec
from models.losses import binary_loss, cox_loss, multitask_loss, regression_loss, task_losses

NAN = float("nan")


def test_binary_loss_ignores_missing_labels():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.3], requires_grad=True)
    labels = torch.tensor([1.0, NAN, 0.0, 1.0])
    loss = binary_loss(logits, labels)
    expected = F.binary_cross_entropy_with_logits(logits[[0, 2, 3]], labels[[0, 2, 3]])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad[1].item() == 0.0  # the missing label contributes no gradient
    assert logits.grad[0].item() != 0.0


def test_regression_loss_ignores_missing_labels():
    predictions = torch.tensor([0.0, 1.0, 2.0])
    targets = torch.tensor([1.0, NAN, 4.0])
    assert regression_loss(predictions, targets).item() == pytest.approx((1.0 + 4.0) / 2)


@pytest.mark.parametrize("n", [0, 3])
def test_a_batch_without_labels_gives_zero_and_backpropagates(n):
    logits = torch.zeros(n, requires_grad=True)
    outputs = {"b": logits, "r": logits * 2, "s": logits * 3}
    targets = {"b": torch.full((n,), NAN), "r": torch.full((n,), NAN), "s": torch.full((n, 2), NAN)}
    tasks = [TaskSpec("b", "binary"), TaskSpec("r", "regression"), TaskSpec("s", "survival")]
    loss = multitask_loss(outputs, targets, tasks)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(n))


def test_cox_loss_matches_a_hand_computed_breslow_value():
    # times 1, 2, 2 (tied events), 3 (censored); a fifth row is missing and must be ignored
    eta = torch.tensor([0.1, 0.2, -0.3, 0.4, 5.0], dtype=torch.float64)
    survival = torch.tensor([[1.0, 1.0], [2.0, 1.0], [2.0, 1.0], [3.0, 0.0], [NAN, 1.0]], dtype=torch.float64)
    log_risk_t1 = math.log(math.exp(0.1) + math.exp(0.2) + math.exp(-0.3) + math.exp(0.4))
    log_risk_t2 = math.log(math.exp(0.2) + math.exp(-0.3) + math.exp(0.4))  # Breslow: both ties share it
    expected = -((0.1 - log_risk_t1) + (0.2 - log_risk_t2) + (-0.3 - log_risk_t2)) / 3
    assert cox_loss(eta, survival).item() == pytest.approx(expected, rel=1e-12)
    order = torch.tensor([3, 0, 4, 2, 1])
    assert cox_loss(eta[order], survival[order]).item() == pytest.approx(expected, rel=1e-12)


def test_cox_loss_matches_an_explicit_risk_set_matrix():
    generator = torch.Generator().manual_seed(0)
    eta = torch.randn(40, generator=generator, dtype=torch.float64)
    time = torch.randint(1, 8, (40,), generator=generator).double()  # many ties
    event = (torch.rand(40, generator=generator) < 0.6).double()
    at_risk = time[None, :] >= time[:, None]
    log_risk_set = torch.logsumexp(torch.where(at_risk, eta[None, :], -torch.inf), dim=1)
    expected = -(event * (eta - log_risk_set)).sum() / event.sum()
    assert cox_loss(eta, torch.stack([time, event], 1)).item() == pytest.approx(expected.item(), rel=1e-10)


def test_cox_loss_without_events_is_zero():
    eta = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = cox_loss(eta, torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(eta.grad, torch.zeros(2))


def test_cox_loss_rejects_a_flat_target():
    with pytest.raises(ValueError, match=r"expected \(n, 2\) \[time, event\]"):
        cox_loss(torch.zeros(3), torch.zeros(3))


def test_multitask_loss_weights_tasks():
    outputs = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    targets = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, NAN])}
    tasks = [TaskSpec("a", "binary", weight=2.0), TaskSpec("b", "regression", weight=0.5)]
    parts = task_losses(outputs, targets, tasks)
    assert parts["b"].item() == pytest.approx(1.0)
    total = multitask_loss(outputs, targets, tasks)
    assert total.item() == pytest.approx(2.0 * parts["a"].item() + 0.5 * 1.0)


def test_multitask_loss_names_a_missing_task():
    with pytest.raises(KeyError, match="task 'b'"):
        multitask_loss({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, [TaskSpec("b", "binary")])
