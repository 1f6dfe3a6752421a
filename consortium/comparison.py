"""The comparison a benchmark run adds: local-only, pooled and classical arms beside the federated one.

Only possible where one machine holds every member's data (the simulator, POC, a benchmark): the
pooled arm needs the data together, and the paired intervals need every arm's predictions on the same
test samples. The federated arm's predictions are the ones each site kept (``predictions.npz``).

One rule for every network arm: the same number of passes over the member's training data as the
federated run gave it (rounds x local epochs), no selection on validation or test. The classical arms
(penalized logistic / ridge / Cox) choose their penalty on the validation split. Test samples are
scored once, at the end; every figure carries a 95% bootstrap interval, and every difference a paired
one (same resamples for both arms).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs import member_data
from models.baselines import train_local, train_pooled
from models.classical import fit_classical
from models.data import MemberData, TaskSpec, pool_members
from models.metrics import METRICS, primary_metric, spearman_r
from models.training import TrainSettings
from models.uncertainty import (
    bootstrap_metric_values,
    metric_interval,
    paired_difference_interval,
    percentile_interval,
)
from schema import settings
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

ARMS = ("federated", "local", "pooled", "linear_local", "linear_pooled")
COMPARED = ARMS[1:]
"""The arms the federated one is compared with, each by a paired difference."""
N_BOOT = 1000


@dataclass
class ArmPredictions:
    """Per arm, per member, per endpoint: test-split predictions; and the test labels."""

    predictions: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    targets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, arm: str, member: str, predictions: Mapping[str, np.ndarray]) -> None:
        self.predictions.setdefault(arm, {})[member] = {k: np.asarray(v) for k, v in predictions.items()}

    def extend(self, other: ArmPredictions) -> None:
        """Append another fold's test samples (cross-validation: out-of-fold predictions)."""
        for member, targets in other.targets.items():
            mine = self.targets.setdefault(member, {})
            for task, y in targets.items():
                mine[task] = np.concatenate([mine[task], y]) if task in mine else y
        for arm, members in other.predictions.items():
            for member, preds in members.items():
                mine = self.predictions.setdefault(arm, {}).setdefault(member, {})
                for task, p in preds.items():
                    mine[task] = np.concatenate([mine[task], p]) if task in mine else p


def baseline_arms(config: ConsortiumConfig, fold_ids: list[int | None], *, passes: int) -> list[ArmPredictions]:
    """Each fold's baseline arms (:func:`baseline_predictions`), from the members' data: nothing in them
    comes from a federated job, so they can be computed while it runs."""
    arms = []
    for fold in fold_ids:
        data = {m.name: member_data.load_member_data(config, m.name, fold=fold) for m in config.members}
        arms.append(baseline_predictions(config, data, passes=passes))
    return arms


def baseline_predictions(
    config: ConsortiumConfig, data: Mapping[str, MemberData], *, passes: int, seed_offset: int = 0
) -> ArmPredictions:
    """Train the local, pooled and classical arms on the members' splits; their test predictions."""
    train = TrainSettings(
        **{**settings.train_settings(config, epochs=passes), "seed": config.training.seed + seed_offset}
    )
    network = settings.network(config)
    tasks = {m.name: member_data.task_specs(config, m.name) for m in config.members}
    arms = ArmPredictions()
    pooled = train_pooled(data, tasks, settings=train, network=network, select=False, max_epochs=passes)
    for member, member_tasks in tasks.items():
        local = train_local(
            data[member], member_tasks, settings=train, network=network, select=False, max_epochs=passes
        )
        arms.targets[member] = dict(local.test_targets)
        arms.add("local", member, local.predictions)
        arms.add("pooled", member, pooled.predictions[member])
        arms.add("linear_local", member, _linear(data[member], member_tasks, seed=train.seed))
    arms.predictions["linear_pooled"] = _linear_pooled(data, tasks, seed=train.seed)
    return arms


def _linear(data: MemberData, tasks: list[TaskSpec], *, seed: int) -> dict[str, np.ndarray]:
    train, val, test = (data.subset(s) for s in ("train", "val", "test"))
    return {
        t.name: fit_classical(t.kind, train.X, train.targets[t.name], val.X, val.targets[t.name], seed=seed).predict(
            test.X
        )
        for t in tasks
    }


def _linear_pooled(
    data: Mapping[str, MemberData], tasks: Mapping[str, list[TaskSpec]], *, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    endpoints: dict[str, TaskSpec] = {t.name: t for ts in tasks.values() for t in ts}
    pooled = pool_members(data, list(endpoints.values()))
    train, val = pooled.subset("train"), pooled.subset("val")
    models = {
        name: fit_classical(t.kind, train.X, train.targets[name], val.X, val.targets[name], seed=seed)
        for name, t in endpoints.items()
    }
    return {m: {t.name: models[t.name].predict(data[m].subset("test").X) for t in ts} for m, ts in tasks.items()}


def member_figures(arms: ArmPredictions, *, kinds: Mapping[str, str], seed: int) -> dict[str, dict[str, Any]]:
    """Per member and endpoint: each arm's figure with its interval, and the paired differences."""
    out: dict[str, dict[str, Any]] = {}
    for member, targets in arms.targets.items():
        for task, y in targets.items():
            kind = kinds[task]
            out.setdefault(member, {})[task] = _figures(
                kind,
                y,
                {a: arms.predictions[a][member][task] for a in ARMS if member in arms.predictions.get(a, {})},
                strata=None,
                seed=seed,
            )
    return out


def endpoint_figures(
    arms: ArmPredictions, *, kinds: Mapping[str, str], holders: Mapping[str, list[str]], seed: int
) -> dict[str, dict[str, Any]]:
    """Per endpoint, within members: the C-index over pairs inside each member; AUROC and R2 each holding
    member's own, averaged with weights by its labelled test samples (:func:`within_member_figures`). The
    AUROC or R2 over all holders' samples together is kept apart, as ``pooled_samples``: member differences
    alone (a prediction carrying only each member's mean) raise it."""
    out = {}
    for task, members in holders.items():
        kind = kinds[task]
        present = [a for a in ARMS if all(m in arms.predictions.get(a, {}) for m in members)]
        ys = [arms.targets[m][task] for m in members]
        predictions = {a: [arms.predictions[a][m][task] for m in members] for a in present}
        if kind == "survival":
            strata = np.concatenate([np.full(len(y), i) for i, y in enumerate(ys)])
            joined = {a: np.concatenate(p) for a, p in predictions.items()}
            figures = _figures(kind, np.concatenate(ys), joined, strata=strata, seed=seed)
        else:
            figures = within_member_figures(kind, ys, predictions, seed=seed)
            if "members_left_out" in figures:
                figures["members_left_out"] = [members[i] for i in figures["members_left_out"]]
            if kind == "regression":
                figures["spearman_r"] = _within_member_spearman(ys, predictions)
            if len(members) > 1:
                figures["pooled_samples"] = {
                    a: _metric(kind, np.concatenate(ys), np.concatenate(p)) for a, p in predictions.items()
                }
        out[task] = {"type": kind, "metric": primary_metric(kind), "members": list(members), **figures}
    return out


def within_member_figures(
    kind: str, ys: Sequence[np.ndarray], predictions: Mapping[str, Sequence[np.ndarray]], *, seed: int
) -> dict[str, Any]:
    """AUROC or R2 within members: each member's figure, averaged with weights by its labelled test samples,
    with 95% percentile-bootstrap intervals (resampled within each member; every arm on the same resamples,
    so the differences are paired). A member whose labels leave the metric undefined (one class, a constant
    target) is left out; its index is in ``members_left_out``."""
    arms = list(predictions)
    weights, estimates, values, left_out = [], [], [], []
    for i, y in enumerate(ys):
        labelled = int(np.sum(~np.isnan(np.asarray(y, dtype=np.float64))))
        if not math.isfinite(_metric(kind, y, np.arange(len(y), dtype=np.float64))):
            left_out.append(i)
            continue
        member = [predictions[a][i] for a in arms]
        weights.append(labelled)
        estimates.append([_metric(kind, y, p) for p in member])
        values.append(bootstrap_metric_values(kind, y, member, n_boot=N_BOOT, seed=seed + i))
    figures: dict[str, Any] = {"ci": {}, "difference": {}, "n": int(sum(weights))}
    if left_out:
        figures["members_left_out"] = left_out
    if not weights:
        return {**figures, **{a: math.nan for a in arms}, "ci": {a: [math.nan, math.nan] for a in arms}}
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    estimate = w @ np.asarray(estimates)  # (arms,)
    resampled = np.einsum("m,mba->ba", w, np.stack(values))  # (n_boot, arms); nan where a member's was
    for j, arm in enumerate(arms):
        interval = percentile_interval(float(estimate[j]), resampled[:, j], n=figures["n"])
        figures[arm] = interval.estimate
        figures["ci"][arm] = [interval.low, interval.high]
    if "federated" in arms:
        f = arms.index("federated")
        for arm in COMPARED:
            if arm in arms:
                j = arms.index(arm)
                diff = percentile_interval(
                    float(estimate[f] - estimate[j]), resampled[:, f] - resampled[:, j], n=figures["n"]
                )
                figures["difference"][f"federated-{arm}"] = _verdict(diff)
    return figures


def _within_member_spearman(ys: Sequence[np.ndarray], predictions: Mapping[str, Sequence[np.ndarray]]) -> dict:
    """Per arm, Spearman's rank correlation within each member, averaged with weights by its labelled test
    samples (how well an arm orders a member's samples: ranking candidate sites); no interval."""
    weights = np.array([np.sum(~np.isnan(np.asarray(y, dtype=np.float64))) for y in ys], dtype=np.float64)
    out = {}
    for arm, member_predictions in predictions.items():
        values = np.array([spearman_r(y, p) for y, p in zip(ys, member_predictions, strict=True)])
        keep = np.isfinite(values) & (weights > 0)
        out[arm] = float(np.average(values[keep], weights=weights[keep])) if keep.any() else math.nan
    return out


def _metric(kind: str, y: np.ndarray, prediction: np.ndarray) -> float:
    return float(METRICS[kind][primary_metric(kind)](np.asarray(y), np.asarray(prediction)))


def _verdict(diff) -> dict[str, Any]:
    """A paired difference with its interval: a gain where the whole interval is above 0, a loss where it
    is below."""
    return {
        "estimate": diff.estimate,
        "ci": [diff.low, diff.high],
        "gain": bool(diff.low > 0),
        "loss": bool(diff.high < 0),
    }


def _figures(kind: str, y: np.ndarray, predictions: Mapping[str, np.ndarray], *, strata, seed: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"ci": {}, "difference": {}}
    for arm, p in predictions.items():
        interval = metric_interval(kind, y, p, strata=strata, seed=seed)
        figures[arm] = interval.estimate
        figures["ci"][arm] = [interval.low, interval.high]
        figures["n"] = interval.n
    if "federated" in predictions:
        for arm in COMPARED:
            if arm in predictions:
                diff = paired_difference_interval(
                    kind, y, predictions["federated"], predictions[arm], strata=strata, seed=seed
                )
                figures["difference"][f"federated-{arm}"] = _verdict(diff)
    return figures
