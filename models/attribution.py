"""Biomarker scoring: attribute a task head's output back through the trunk to input features.

Each member scores its own tasks locally (:func:`rank_features`); the consortium ranking is an
aggregate of those tables (:func:`consensus_ranking`), and recovery of planted biomarkers is
measured with :func:`precision_at_k`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from models.network import MultitaskNet

logger = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "gradient_x_input")
COLUMNS = ["feature", "score", "rank"]
_MAX_ROWS = 8192  # interpolated rows per forward pass: bounds memory, keeps batches large


def _baseline(data_x: np.ndarray, baseline: float | np.ndarray | None) -> np.ndarray:
    n_features = data_x.shape[1]
    if baseline is None:
        return data_x.mean(axis=0)
    values = np.broadcast_to(np.asarray(baseline, dtype=np.float32), (n_features,))
    return np.array(values, dtype=np.float32)


def _input_gradients(model: MultitaskNet, task: str, points: torch.Tensor) -> torch.Tensor:
    points = points.detach().requires_grad_(True)
    output = model.forward_task(points, task).sum()
    (gradient,) = torch.autograd.grad(output, points)
    return gradient


def attributions(
    model: MultitaskNet,
    data_x: np.ndarray,
    task: str,
    *,
    method: str = "integrated_gradients",
    steps: int = 32,
    baseline: float | np.ndarray | None = None,
) -> np.ndarray:
    """Per-sample, per-feature attributions ``(n_samples, n_features)`` of one task's output.

    Integrated gradients use the midpoint rule over ``steps`` points of the straight path from
    ``baseline`` to each sample, all steps of a chunk of samples in one forward/backward pass.
    ``gradient_x_input`` is the one-step version (gradient at the sample times its distance to
    the baseline).
    """
    if method not in METHODS:
        raise ValueError(f"method='{method}'; use one of {METHODS}")
    if steps < 1:
        raise ValueError(f"steps={steps}; use at least 1 (32 is a good default)")
    data_x = np.asarray(data_x, dtype=np.float32)
    if data_x.ndim != 2 or data_x.shape[1] != model.n_features:
        raise ValueError(f"data_X has shape {data_x.shape}; expected (n, {model.n_features})")
    if data_x.shape[0] == 0:
        raise ValueError("data_X has no samples; attribution needs at least one")
    x = torch.from_numpy(data_x)
    base = torch.from_numpy(_baseline(data_x, baseline))
    delta = x - base
    midpoints = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    alphas = torch.ones(1) if method == "gradient_x_input" else midpoints
    chunk = max(1, _MAX_ROWS // alphas.numel())
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, x.shape[0], chunk):
            d = delta[start : start + chunk]
            path = base + alphas[:, None, None] * d[None]  # (steps, chunk, n_features)
            gradient = _input_gradients(model, task, path.reshape(-1, d.shape[1]))
            parts.append(gradient.reshape(alphas.numel(), *d.shape).mean(dim=0) * d)
    finally:
        model.train(was_training)
    return torch.cat(parts).double().numpy()


def _ranked(features: Sequence[str], scores: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame({"feature": list(features), "score": np.asarray(scores, dtype=np.float64)})
    # strongest first; ties broken by name so the ranking is reproducible
    table = table.sort_values(["score", "feature"], ascending=[False, True], kind="mergesort")
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)[COLUMNS]


def rank_features(
    model: MultitaskNet,
    data_X: np.ndarray,
    task: str,
    *,
    feature_names: Sequence[str],
    method: str = "integrated_gradients",
    steps: int = 32,
    baseline: float | np.ndarray | None = None,
) -> pd.DataFrame:
    """Rank input features by their attribution to one task's head.

    Parameters
    ----------
    model
        The member's trained network (unwrapped).
    data_X
        ``(n_samples, n_features)`` samples to attribute over (e.g. the member's train split).
    task
        The head to explain.
    feature_names
        Panel feature identifiers, in column order.
    method
        ``"integrated_gradients"`` (default) or ``"gradient_x_input"``.
    steps
        Integration steps of integrated gradients.
    baseline
        Reference input: ``None`` uses the per-feature mean of ``data_X``; a scalar or an
        ``(n_features,)`` array otherwise.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature``, ``score`` (mean absolute attribution over samples), ``rank``
        (1 = strongest), sorted by rank.
    """
    if len(feature_names) != model.n_features:
        raise ValueError(
            f"{len(feature_names)} feature names for a model with {model.n_features} inputs; "
            "pass the panel's feature names in column order"
        )
    values = attributions(model, data_X, task, method=method, steps=steps, baseline=baseline)
    return _ranked(feature_names, np.abs(values).mean(axis=0))


def consensus_ranking(
    tables: Sequence[pd.DataFrame], *, weights: Sequence[float] | None = None
) -> pd.DataFrame:
    """Aggregate rankings (members x tasks) into one: the weighted mean of normalized scores.

    Each table's scores are divided by their sum, so every table has the same total say whatever
    its output scale; a feature absent from a table scores 0 there.

    Parameters
    ----------
    tables
        Tables from :func:`rank_features` (columns ``feature``, ``score``).
    weights
        One non-negative weight per table (e.g. its number of samples); equal by default.
    """
    tables = list(tables)
    if not tables:
        raise ValueError("no rankings to aggregate; pass at least one table from rank_features")
    weights = np.ones(len(tables)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(tables),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights={list(weights)}; give one non-negative weight per table, not all 0")
    columns = []
    for i, table in enumerate(tables):
        missing = {"feature", "score"} - set(table.columns)
        if missing:
            raise ValueError(f"table {i} lacks columns {sorted(missing)}; use tables from rank_features")
        scores = table.set_index("feature")["score"].astype(np.float64)
        total = scores.sum()
        columns.append(scores / total if total > 0 else scores * 0.0)
    normalized = pd.concat(columns, axis=1).fillna(0.0)
    combined = normalized.to_numpy() @ (weights / weights.sum())
    return _ranked(list(normalized.index), combined)


def precision_at_k(table: pd.DataFrame, truth: Sequence[str], *, k: int | None = None) -> float:
    """Fraction of the top-``k`` ranked features that are in ``truth`` (``k`` = ``len(truth)``)."""
    truth = set(truth)
    if not truth:
        raise ValueError("truth is empty; pass the planted biomarkers (ground_truth.json)")
    k = len(truth) if k is None else int(k)
    if k < 1:
        raise ValueError(f"k={k}; use k >= 1")
    top = table.sort_values("rank").head(k)["feature"]
    return float(top.isin(truth).sum() / k)
