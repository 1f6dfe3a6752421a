"""Biomarker scoring: attribute a task head's output back through the trunk to input features.

Each member scores its own tasks locally (:func:`rank_features`, integrated gradients from
Captum); the consortium ranking adds the members' signed, normalized score vectors
(:func:`normalized_scores`, :func:`ranking_from_vector`) or aggregates their tables
(:func:`consensus_ranking`); recovery of known biomarkers is measured with :func:`precision_at_k`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients
from torch import nn

from models.network import MultitaskNet

logger = logging.getLogger(__name__)

COLUMNS = ["feature", "score", "direction", "rank"]
# Interpolated input values per Captum call: each call holds a few tensors of this size (path
# points, their gradients, scaled gradients), so 2**24 float32 values keep it near 300 MB.
_MAX_PATH_VALUES = 2**24


class _TaskOutput(nn.Module):
    """One task's raw output ``(n,)``: the forward function Captum attributes."""

    def __init__(self, model: MultitaskNet, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_task(x, self.task)


def _as_samples(model: MultitaskNet, data_X: np.ndarray) -> np.ndarray:
    data_X = np.asarray(data_X, dtype=np.float32)
    if data_X.ndim != 2 or data_X.shape[1] != model.n_features:
        raise ValueError(f"data_X has shape {data_X.shape}; expected (n_samples, {model.n_features})")
    if data_X.shape[0] == 0:
        raise ValueError("data_X has no samples; attribution needs at least one")
    if not np.isfinite(data_X).all():
        raise ValueError("data_X holds NaN/inf values; normalize and impute in the omics layer first")
    return data_X


def _baseline(data_X: np.ndarray, baseline: float | np.ndarray | None) -> np.ndarray:
    n_features = data_X.shape[1]
    if baseline is None:
        return data_X.mean(axis=0, dtype=np.float64).astype(np.float32)
    values = np.asarray(baseline, dtype=np.float32)
    if values.ndim > 1 or values.size not in (1, n_features):
        raise ValueError(f"baseline has shape {values.shape}; give a scalar or ({n_features},) values")
    return np.array(np.broadcast_to(values, (n_features,)), dtype=np.float32)


def attributions(
    model: MultitaskNet,
    data_X: np.ndarray,
    task: str,
    *,
    n_steps: int = 32,
    baseline: float | np.ndarray | None = None,
) -> np.ndarray:
    """Signed integrated gradients of one task's raw output, per sample and feature.

    Parameters
    ----------
    model
        The member's network (unwrapped; with DP, ``trainer.model``). Evaluated in eval mode,
        its mode is restored afterwards.
    data_X
        ``(n_samples, n_features)`` inputs in panel order.
    task
        The head to explain; its raw output is a logit, a standardized value or a log-risk.
    n_steps
        Integration points (Gauss-Legendre) on the path from the baseline to each sample.
    baseline
        Reference input: ``None`` uses the per-feature mean of ``data_X``; a scalar or an
        ``(n_features,)`` array otherwise.

    Returns
    -------
    numpy.ndarray
        ``(n_samples, n_features)`` float64 attributions in output units; each row sums to
        ``f(x) - f(baseline)`` up to the integration error. Rescaling a feature's input rescales
        its gradient inversely, so attributions do not depend on the inputs' units.
    """
    if int(n_steps) < 1:
        raise ValueError(f"n_steps={n_steps}; use at least 1 (32 is a good default)")
    if task not in model.heads:
        raise KeyError(f"no head for task '{task}'; this model has {model.task_names}")
    data_X = _as_samples(model, data_X)
    device = next(model.parameters()).device
    base = torch.from_numpy(_baseline(data_X, baseline))[None].to(device)
    chunk = max(1, _MAX_PATH_VALUES // (int(n_steps) * data_X.shape[1]))
    explainer = IntegratedGradients(_TaskOutput(model, task))
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, data_X.shape[0], chunk):
            x = torch.from_numpy(data_X[start : start + chunk]).to(device)
            values = explainer.attribute(x, baselines=base, n_steps=int(n_steps))
            parts.append(values.detach().cpu().double().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts)


def _task_kind(model: MultitaskNet, task: str) -> str:
    kinds = {t.name: t.kind for t in model.tasks}
    if task not in kinds:
        raise KeyError(f"no head for task '{task}'; this model has {model.task_names}")
    return kinds[task]


def _groups(kind: str, task: str, labels: np.ndarray | None, output: np.ndarray) -> tuple[np.ndarray, str]:
    """Per sample 1 (high group), 0 (low group) or -1 (left out), and how the groups were made."""
    n = output.shape[0]
    if labels is not None and kind == "binary":
        labels = np.asarray(labels, dtype=np.float64)
        if labels.shape != (n,):
            raise ValueError(
                f"labels of task '{task}' have shape {labels.shape}; expected ({n},), one 0/1 label per row "
                "of data_X (NaN when missing)"
            )
        observed = labels[~np.isnan(labels)]
        if not np.isin(observed, (0.0, 1.0)).all():
            raise ValueError(f"labels of binary task '{task}' hold values other than 0/1/NaN; use 0/1")
        groups = np.where(np.isnan(labels), -1, labels).astype(np.int64)
        how = "labels"
    elif labels is not None:
        raise ValueError(
            f"labels were given for {kind} task '{task}'; labels are used for binary tasks only, "
            f"{kind} tasks split on the model's prediction: pass labels=None"
        )
    else:
        # ties at the median go low, so a constant output leaves the high group empty (checked below)
        groups = (output > np.median(output)).astype(np.int64)
        how = "predicted output above/below its median"
    counts = [int((groups == g).sum()) for g in (1, 0)]
    if min(counts) == 0:
        raise ValueError(
            f"task '{task}': the contrast needs samples in both groups ({how}); found {counts[0]} high and "
            f"{counts[1]} low. Pass data_X rows from both classes, or a model whose output varies"
        )
    return groups, how


def _contrast(values: np.ndarray, weights_high: np.ndarray, weights_low: np.ndarray) -> np.ndarray:
    """Weighted mean attribution of the high group minus that of the low group (rows of weights)."""
    high = weights_high @ values / weights_high.sum(axis=-1, keepdims=True)
    low = weights_low @ values / weights_low.sum(axis=-1, keepdims=True)
    return high - low


def _bootstrap_frequency(
    values: np.ndarray, groups: np.ndarray, *, n_boot: int, top_k: int, seed: int
) -> np.ndarray:
    """Fraction of stratified row resamples in which each feature is among the ``top_k`` by |contrast|."""
    rng = np.random.default_rng(seed)
    n_features = values.shape[1]
    counts = np.zeros(n_features)
    weights = {}
    for g in (1, 0):
        rows = np.flatnonzero(groups == g)
        # multinomial counts = how often each row is drawn when resampling the group with replacement
        draws = rng.multinomial(rows.size, np.full(rows.size, 1.0 / rows.size), size=n_boot)
        weights[g] = np.zeros((n_boot, groups.size))
        weights[g][:, rows] = draws
    scores = np.abs(_contrast(values, weights[1], weights[0]))
    k = min(top_k, n_features)
    for row in scores:
        order = np.lexsort((np.arange(n_features), -row))  # ties broken by column: reproducible
        counts[order[:k]] += 1
    return counts / n_boot


def rank_features(
    model: MultitaskNet,
    data_X: np.ndarray,
    task: str,
    *,
    feature_names: Sequence[str],
    labels: np.ndarray | None = None,
    n_steps: int = 32,
    baseline: float | np.ndarray | None = None,
    n_boot: int = 0,
    top_k: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Rank input features by how their attributions separate high from low outcomes.

    Integrated gradients (:func:`attributions`) give each sample's per-feature share of the
    task's output. The score of feature ``j`` is the absolute contrast

    ``contrast_j = mean attribution_j over the high group - mean over the low group``

    with the groups given per kind:

    * binary, ``labels`` given: positives (1) vs negatives (0); NaN rows are left out;
    * binary without ``labels``, regression and survival: samples whose predicted output (logit,
      value, log-risk) lies above vs at or below its median over ``data_X``.

    Why the contrast and not the mean absolute attribution: a feature that moves the output of
    every sample a lot but equally in both groups (a broadly variable gene, a batch effect the
    model absorbed) does not explain *who* is positive or at high risk; the contrast is what a
    differential-expression test measures, in the model's output units. For a linear model with
    the mean baseline it equals ``weight_j * (mean x_j | high - mean x_j | low)``. Each group
    weighs the same whatever its size, so rare classes are not drowned. For survival the groups
    are the model's own high- and low-risk halves, because censored times give no clean class
    label; the score is then the feature's share in separating the two halves.

    The direction is the sign of the feature's effect, ``sum_i a_ij (x_ij - b_j)``: the
    least-squares slope of its attributions on its displacement from the baseline ``b``, the
    model's weight for a linear model. ``+1``: a higher value raises the output (pushes toward
    the positive class, a higher value, a higher risk); ``-1``: it lowers it; ``0``: no effect.
    (The sign of the contrast itself is not the direction: a feature the model uses the right
    way has a positive contrast whether it is up or down in the high group.)

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
    labels
        Binary tasks only: ``(n_samples,)`` 0/1 labels of ``data_X`` (NaN when missing).
    n_steps, baseline
        Passed to :func:`attributions`.
    n_boot
        Bootstrap resamples for the ``frequency`` column; 0 skips it. Attributions are computed
        once; rows are resampled within each group and the contrast recomputed.
    top_k
        The ``frequency`` column counts how often a feature ranks within the top ``top_k``.
    seed
        Seed of the bootstrap.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature``, ``score`` (``|contrast|``, output units), ``direction`` (-1, 0, +1),
        ``rank`` (1 = strongest) and, with ``n_boot > 0``, ``frequency`` in [0, 1]; sorted by rank.
    """
    if len(feature_names) != model.n_features:
        raise ValueError(
            f"{len(feature_names)} feature names for a model with {model.n_features} inputs; "
            "pass the panel's feature names in column order"
        )
    if int(n_boot) < 0 or int(top_k) < 1:
        raise ValueError(f"n_boot={n_boot}, top_k={top_k}; use n_boot >= 0 and top_k >= 1")
    kind = _task_kind(model, task)
    data_X = _as_samples(model, data_X)
    values = attributions(model, data_X, task, n_steps=n_steps, baseline=baseline)
    output = model.predict(data_X)[task]
    groups, how = _groups(kind, task, labels, output)
    used = groups >= 0
    contrast = _contrast(values, (groups == 1).astype(np.float64), (groups == 0).astype(np.float64))
    displacement = data_X[used] - _baseline(data_X, baseline)
    direction = np.sign(np.einsum("ij,ij->j", values[used], displacement))
    logger.debug("task '%s' (%s): contrast of %s over %d samples", task, kind, how, int(used.sum()))
    frequency = None
    if n_boot:
        frequency = _bootstrap_frequency(values, groups, n_boot=int(n_boot), top_k=int(top_k), seed=seed)
    return _ranked(feature_names, np.abs(contrast), direction, frequency=frequency)


def _ranked(
    features: Sequence[str],
    scores: np.ndarray,
    direction: np.ndarray,
    *,
    frequency: np.ndarray | None = None,
) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "feature": [str(f) for f in features],
            "score": np.asarray(scores, dtype=np.float64),
            "direction": np.asarray(direction, dtype=np.int64),
        }
    )
    columns = list(COLUMNS)
    if frequency is not None:
        table["frequency"] = np.asarray(frequency, dtype=np.float64)
        columns.append("frequency")
    # strongest first; ties broken by name so the ranking is reproducible
    table = table.sort_values(["score", "feature"], ascending=[False, True], kind="mergesort")
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)[columns]


def _check_table(table: pd.DataFrame, what: str) -> None:
    missing = {"feature", "score"} - set(table.columns)
    if missing:
        raise ValueError(f"{what} lacks columns {sorted(missing)}; use tables from rank_features")


def _aligned(table: pd.DataFrame, feature_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(|score|, direction)`` of a table in ``feature_names`` order; 0 for absent features."""
    position = {str(name): i for i, name in enumerate(feature_names)}
    unknown = [str(f) for f in table["feature"] if str(f) not in position]
    if unknown:
        raise ValueError(
            f"table ranks {len(unknown)} features not in feature_names (e.g. {unknown[:5]}); "
            "pass the consortium panel the rankings were made on"
        )
    rows = [position[str(f)] for f in table["feature"]]
    scores, direction = np.zeros(len(position)), np.zeros(len(position))
    scores[rows] = np.abs(table["score"].to_numpy(dtype=np.float64))
    direction[rows] = table["direction"].to_numpy(dtype=np.float64) if "direction" in table else 1.0
    return scores, direction


def normalized_scores(table: pd.DataFrame, feature_names: Sequence[str]) -> np.ndarray:
    """A ranking as a signed score vector in ``feature_names`` order, with ``sum |score| = 1``.

    Entry ``j`` is ``direction_j * score_j / sum |score|``: vectors of members and tasks with
    different output scales can be added (or weighted and added) into a consensus and turned back
    into a table with :func:`ranking_from_vector`. Features absent from the table get 0; a table
    without a ``direction`` column counts as all ``+1``; an all-zero table stays all zero.

    Raises
    ------
    ValueError
        If the table names features that are not in ``feature_names``.
    """
    _check_table(table, "table")
    scores, direction = _aligned(table, feature_names)
    vector = direction * scores
    total = np.abs(vector).sum()
    return vector / total if total > 0 else vector


def ranking_from_vector(
    feature_names: Sequence[str], signed_scores: np.ndarray, *, frequency: np.ndarray | None = None
) -> pd.DataFrame:
    """The table (columns of :func:`rank_features`) of a signed score vector, e.g. a sum of
    :func:`normalized_scores`: ``score = |value|``, ``direction = sign(value)``."""
    signed_scores = np.asarray(signed_scores, dtype=np.float64)
    if signed_scores.shape != (len(feature_names),):
        raise ValueError(
            f"signed_scores has shape {signed_scores.shape} for {len(feature_names)} feature names; "
            "give one score per feature, in feature_names order"
        )
    if frequency is not None and np.shape(frequency) != signed_scores.shape:
        raise ValueError(f"frequency has shape {np.shape(frequency)}; expected {signed_scores.shape}")
    return _ranked(feature_names, np.abs(signed_scores), np.sign(signed_scores), frequency=frequency)


def consensus_ranking(
    tables: Sequence[pd.DataFrame], *, weights: Sequence[float] | None = None
) -> pd.DataFrame:
    """Aggregate rankings (members x tasks) into one: the weighted mean of normalized scores.

    Each table's ``|score|`` is divided by its sum, so every table has the same total say whatever
    its output scale; a feature absent from a table scores 0 there. The consensus direction is
    the sign of the weighted sum of ``direction * normalized score``; tables without a
    ``direction`` column (e.g. read back from an older CSV) add nothing to it.

    Parameters
    ----------
    tables
        Tables from :func:`rank_features` (columns ``feature``, ``score``, optionally ``direction``).
    weights
        One non-negative weight per table (e.g. its number of samples); equal by default.
    """
    tables = list(tables)
    if not tables:
        raise ValueError("no rankings to aggregate; pass at least one table from rank_features")
    weights = np.ones(len(tables)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(tables),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights={list(weights)}; give one non-negative weight per table, not all 0")
    for i, table in enumerate(tables):
        _check_table(table, f"table {i}")
    features = list(dict.fromkeys(str(f) for table in tables for f in table["feature"]))
    magnitude, signed = np.zeros(len(features)), np.zeros(len(features))
    for table, weight in zip(tables, weights / weights.sum(), strict=True):
        scores, direction = _aligned(table, features)
        total = scores.sum()
        share = scores / total if total > 0 else scores
        magnitude += weight * share
        if "direction" in table:
            signed += weight * direction * share
    return _ranked(features, magnitude, np.sign(signed))


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
