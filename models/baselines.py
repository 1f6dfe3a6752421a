"""Reference points for the federated model: each member alone, and all data pooled.

``local``: a member trains its own trunk and heads on its data only (what it gets without the
consortium). ``pooled``: one trunk and one head per endpoint on all members' data together (what
centralizing the data would give; not something the consortium may do, only a yardstick). A
shared endpoint (same name and kind at several members) gets one pooled head trained on all its
holders' labels. Both fit with :meth:`~models.training.LocalTrainer.fit`, by default selecting the
epoch on the mean primary validation metric, the same rule as every other compared model, and
both are scored on each member's own test split.

Each result also carries the test-split predictions and labels (rows in the member's order of
``data.subset("test")``), so confidence intervals or paired comparisons can be computed later
without re-running the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.data import MemberData, TaskSpec, merge_tasks, pool_members
from models.metrics import evaluate
from models.network import MultitaskNet
from models.training import FitResult, LocalTrainer, TrainSettings

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]  # task name -> metric name -> value
Arrays = dict[str, np.ndarray]  # task name -> one value (or [time, event] row) per test sample


@dataclass
class BaselineResult:
    """A member's own model, its test metrics and its test-split predictions and labels.

    Attributes
    ----------
    model
        The trained network (weights of the selected epoch).
    metrics
        ``{task: {metric: value}}`` on the member's test split.
    predictions
        ``{task: (n_test,)}`` as :meth:`MultitaskNet.predict` gives them (logits, original units,
        log-risks), in the row order of ``data.subset("test")``.
    test_targets
        ``{task: (n_test,) or (n_test, 2)}`` the test labels in the same order (``NaN`` = missing).
    fit
        The :class:`~models.training.FitResult` of the training.
    """

    model: MultitaskNet
    metrics: Metrics
    predictions: Arrays
    test_targets: Arrays
    fit: FitResult


@dataclass
class PooledResult:
    """The pooled model and, per member, its test metrics, predictions and labels on its own tasks.

    Attributes
    ----------
    model
        The pooled network: one trunk and one head per endpoint name.
    metrics
        ``{member: {task: {metric: value}}}``, each member on its own test split.
    predictions, test_targets
        ``{member: {task: array}}`` as in :class:`BaselineResult`, for each member's test rows.
    fit
        The :class:`~models.training.FitResult` of the pooled training.
    """

    model: MultitaskNet
    metrics: dict[str, Metrics]
    predictions: dict[str, Arrays]
    test_targets: dict[str, Arrays]
    fit: FitResult


def _check_network(network: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"trunk_widths", "head_width", "dropout"}
    unknown = sorted(set(network) - allowed)
    if unknown:
        raise ValueError(f"network has unknown keys {unknown}; use {sorted(allowed)}")
    return dict(network)


def predict_test_split(model: MultitaskNet, data: MemberData, tasks: Sequence[TaskSpec]) -> tuple[Arrays, Arrays]:
    """``(predictions, labels)`` per task on the test split of ``data``, in its row order."""
    test = data.subset("test")
    predicted = model.predict(test.X)
    predictions = {t.name: predicted[t.name] for t in tasks}
    labels = {t.name: np.asarray(test.targets[t.name], dtype=np.float64).copy() for t in tasks}
    return predictions, labels


def train_local(
    data: MemberData,
    tasks: Sequence[TaskSpec],
    *,
    settings: TrainSettings,
    network: Mapping[str, Any],
    select: bool = True,
    max_epochs: int | None = None,
) -> BaselineResult:
    """Fit one member's own network on its data alone and score it on its test split.

    Parameters
    ----------
    data
        The member's samples (train/val/test splits).
    tasks
        The member's tasks (``shared`` plays no role here: nothing leaves the member).
    settings
        Training settings; ``settings.seed`` seeds the weights and the training.
    network
        Keyword arguments of :class:`MultitaskNet`: ``trunk_widths``, ``head_width``, ``dropout``.
    select, max_epochs
        Passed to :meth:`LocalTrainer.fit`: select the epoch on the validation score, or train
        exactly ``max_epochs`` (default ``settings.epochs``).
    """
    model = MultitaskNet(data.n_features, tasks, **_check_network(network), seed=settings.seed)
    trainer = LocalTrainer(model, data, tasks, settings=settings)
    fit = trainer.fit(max_epochs, select=select)
    logger.info("local baseline: %d epochs, selected %d (val score %.3f)", fit.epochs, fit.best_epoch, fit.best_score)
    predictions, labels = predict_test_split(model, data, tasks)
    return BaselineResult(
        model=model, metrics=trainer.evaluate("test"), predictions=predictions, test_targets=labels, fit=fit
    )


def train_pooled(
    members: Mapping[str, MemberData],
    tasks_by_member: Mapping[str, Sequence[TaskSpec]],
    *,
    settings: TrainSettings,
    network: Mapping[str, Any],
    select: bool = True,
    max_epochs: int | None = None,
) -> PooledResult:
    """Fit one network on all members' data pooled; score it on each member's own test split.

    Parameters
    ----------
    members
        Member name -> its samples (same feature panel).
    tasks_by_member
        Member name -> its tasks. Several members may hold the same endpoint (same name and
        kind): it gets one head trained on all their labels.
    settings, network, select, max_epochs
        As for :func:`train_local`.

    Returns
    -------
    PooledResult
        The pooled model (one trunk, one head per endpoint) and, per member and task, test
        metrics, predictions and labels.

    Raises
    ------
    ValueError
        If ``members`` and ``tasks_by_member`` name different members, or two members hold one
        endpoint name with different kinds.
    """
    if set(members) != set(tasks_by_member):
        raise ValueError(
            f"members {sorted(members)} and tasks_by_member {sorted(tasks_by_member)} name different "
            "members; give tasks for every member"
        )
    endpoints = merge_tasks(tasks_by_member)
    pooled = pool_members(members, tasks_by_member)
    model = MultitaskNet(pooled.n_features, endpoints, **_check_network(network), seed=settings.seed)
    trainer = LocalTrainer(model, pooled, endpoints, settings=settings)
    fit = trainer.fit(max_epochs, select=select)
    logger.info(
        "pooled baseline: %d samples, %d endpoints (%d shared), %d epochs, selected %d",
        pooled.X.shape[0],
        len(endpoints),
        sum(t.shared for t in endpoints),
        fit.epochs,
        fit.best_epoch,
    )
    metrics: dict[str, Metrics] = {}
    predictions: dict[str, Arrays] = {}
    labels: dict[str, Arrays] = {}
    for member, data in members.items():
        tasks = list(tasks_by_member[member])
        metrics[member] = evaluate(model, data, tasks, split="test")
        predictions[member], labels[member] = predict_test_split(model, data, tasks)
    return PooledResult(model=model, metrics=metrics, predictions=predictions, test_targets=labels, fit=fit)
