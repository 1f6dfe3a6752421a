"""Masked losses, one per task kind, and their weighted multitask sum.

A ``NaN`` label is missing: it contributes nothing (no term, no gradient, and for Cox it is
outside every risk set). A batch with no label for a task gives an exact ``0`` that is still
connected to the graph, so ``backward()`` works on empty or label-free batches (Opacus' Poisson
sampling produces both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from models.data import TaskSpec


def _masked_mean(terms: torch.Tensor) -> torch.Tensor:
    # sum / max(count, 1): an empty selection gives 0 (not NaN) and keeps the graph
    return terms.sum() / max(int(terms.numel()), 1)


def binary_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the labeled samples.

    Parameters
    ----------
    logits
        ``(n,)`` raw head outputs.
    labels
        ``(n,)`` 0/1 floats, ``NaN`` where missing.
    """
    observed = ~torch.isnan(labels)
    terms = F.binary_cross_entropy_with_logits(logits[observed], labels[observed].to(logits.dtype), reduction="none")
    return _masked_mean(terms)


def regression_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labeled samples; ``targets`` are already standardized."""
    observed = ~torch.isnan(targets)
    return _masked_mean((predictions[observed] - targets[observed].to(predictions.dtype)) ** 2)


def cox_loss(log_risk: torch.Tensor, survival: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    ``loss = -1/d * sum_{i: event} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]`` where ``d`` is
    the number of events. Breslow's approximation gives tied event times the same risk set (all
    samples still at risk at that time), which is what the ``>=`` does. Vectorized: one sort and
    one ``logcumsumexp``; ties are resolved with ``searchsorted``.

    Parameters
    ----------
    log_risk
        ``(n,)`` head outputs (log hazard ratios).
    survival
        ``(n, 2)`` ``[time, event]``; a row with ``NaN`` in either column is missing.
    """
    if survival.ndim != 2 or survival.shape[1] != 2:
        raise ValueError(f"survival targets have shape {tuple(survival.shape)}; expected (n, 2) [time, event]")
    observed = ~torch.isnan(survival).any(dim=1)
    eta = log_risk[observed]
    time = survival[observed, 0].to(eta.dtype)
    event = survival[observed, 1].to(eta.dtype)
    if eta.numel() == 0:
        return eta.sum()
    order = torch.argsort(time, descending=True, stable=True)
    eta, time, event = eta[order], time[order], event[order]
    log_cumulative = torch.logcumsumexp(eta, dim=0)
    # In descending time order a sample's risk set ends at the last sample with the same time.
    ascending = -time
    last_tied = torch.searchsorted(ascending, ascending, right=True) - 1
    log_risk_set = log_cumulative[last_tied]
    n_events = event.sum().clamp(min=1.0)
    return -(event * (eta - log_risk_set)).sum() / n_events


LOSSES = {"binary": binary_loss, "regression": regression_loss, "survival": cox_loss}


def task_losses(
    outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> dict[str, torch.Tensor]:
    """Unweighted masked loss per task name."""
    losses: dict[str, torch.Tensor] = {}
    for task in tasks:
        if task.name not in outputs or task.name not in targets:
            raise KeyError(
                f"task '{task.name}': outputs have {sorted(outputs)}, targets have {sorted(targets)}; "
                "both need the task"
            )
        losses[task.name] = LOSSES[task.kind](outputs[task.name], targets[task.name])
    return losses


def multitask_loss(
    outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """``sum_t weight_t * loss_t`` over ``tasks`` (a task without labels in the batch adds 0)."""
    parts = task_losses(outputs, targets, tasks)
    total = sum((task.weight * parts[task.name] for task in tasks), start=torch.zeros(()))
    return total
