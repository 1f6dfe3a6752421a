"""Reference points for the federated model: each member alone, and all data pooled.

``local``: a member trains its own trunk and heads on its data only (what it gets without the
consortium). ``pooled``: one trunk and every member's heads on all members' data together (what
centralizing the data would give; not something the consortium may do, only a yardstick). Both
fit with early stopping on the validation split and are scored on each member's own test split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.data import MemberData, TaskSpec, pool_members
from models.metrics import evaluate
from models.network import MultitaskNet
from models.training import LocalTrainer, TrainSettings

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]  # task name -> metric name -> value


@dataclass
class BaselineResult:
    """A trained baseline model and its test metrics (per task, per metric)."""

    model: MultitaskNet
    metrics: Metrics


@dataclass
class PooledResult:
    """The pooled model and each member's test metrics on its own tasks."""

    model: MultitaskNet
    metrics: dict[str, Metrics]


def _check_network(network: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"trunk_widths", "head_width", "dropout"}
    unknown = sorted(set(network) - allowed)
    if unknown:
        raise ValueError(f"network has unknown keys {unknown}; use {sorted(allowed)}")
    return dict(network)


def train_local(
    data: MemberData,
    tasks: Sequence[TaskSpec],
    *,
    settings: TrainSettings,
    network: Mapping[str, Any],
) -> BaselineResult:
    """Fit one member's own network on its data alone and score it on its test split.

    Parameters
    ----------
    data
        The member's samples (train/val/test splits).
    tasks
        The member's tasks.
    settings
        Training settings; ``settings.epochs`` caps the fit, ``settings.seed`` seeds it.
    network
        Keyword arguments of :class:`MultitaskNet`: ``trunk_widths``, ``head_width``, ``dropout``.
    """
    model = MultitaskNet(data.n_features, tasks, **_check_network(network), seed=settings.seed)
    trainer = LocalTrainer(model, data, tasks, settings=settings)
    fit = trainer.fit(settings.epochs)
    logger.info("local baseline: %d epochs, best %d", fit.epochs, fit.best_epoch)
    return BaselineResult(model=model, metrics=trainer.evaluate("test"))


def train_pooled(
    members: Mapping[str, MemberData],
    tasks_by_member: Mapping[str, Sequence[TaskSpec]],
    *,
    settings: TrainSettings,
    network: Mapping[str, Any],
) -> PooledResult:
    """Fit one network on all members' data pooled; score it on each member's own test split.

    Parameters
    ----------
    members
        Member name -> its samples (same feature panel).
    tasks_by_member
        Member name -> its tasks; task names are unique across the consortium.
    settings, network
        As for :func:`train_local`.

    Returns
    -------
    PooledResult
        The pooled model (one trunk, every member's heads) and ``{member: {task: {metric: value}}}``.
    """
    if set(members) != set(tasks_by_member):
        raise ValueError(
            f"members {sorted(members)} and tasks_by_member {sorted(tasks_by_member)} name different "
            "members; give tasks for every member"
        )
    owner: dict[str, str] = {}
    all_tasks: list[TaskSpec] = []
    for member, tasks in tasks_by_member.items():
        for task in tasks:
            if task.name in owner:
                raise ValueError(
                    f"task '{task.name}' belongs to both '{owner[task.name]}' and '{member}'; "
                    "task names must be unique in the consortium"
                )
            owner[task.name] = member
            all_tasks.append(task)
    pooled = pool_members(members, all_tasks)
    model = MultitaskNet(pooled.n_features, all_tasks, **_check_network(network), seed=settings.seed)
    trainer = LocalTrainer(model, pooled, all_tasks, settings=settings)
    fit = trainer.fit(settings.epochs)
    logger.info(
        "pooled baseline: %d samples, %d epochs, best %d", pooled.X.shape[0], fit.epochs, fit.best_epoch
    )
    metrics = {
        member: evaluate(model, members[member], list(tasks_by_member[member]), split="test")
        for member in members
    }
    return PooledResult(model=model, metrics=metrics)
