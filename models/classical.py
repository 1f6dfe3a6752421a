"""Penalized linear baselines per task kind, the yardstick a network has to beat.

``binary``: L2 logistic regression (scikit-learn); ``regression``: ridge (scikit-learn);
``survival``: elastic-net Cox (scikit-survival's ``CoxnetSurvivalAnalysis``, ``l1_ratio=0.5``).
Features are standardized on the training split. The penalty strength is chosen on the
validation split by the kind's primary metric (AUROC, R2, Harrell's C), the same rule the networks
are selected by; every candidate is fitted on the training split only, so the validation labels
choose the penalty and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from models.metrics import METRICS, primary_metric

logger = logging.getLogger(__name__)

# candidate penalty strengths, strongest first (a tie on validation keeps the simpler model)
LOGISTIC_PENALTIES = tuple(np.logspace(3, -2, 11))  # 1 / C of LogisticRegression
RIDGE_PENALTIES = tuple(np.logspace(4, -2, 13))  # alpha of Ridge
COXNET_N_ALPHAS = 30  # alphas of the elastic-net Cox path, from the one that zeroes every weight ...
COXNET_MIN_RATIO = 0.01  # ... down to this fraction of it (smaller ones diverge on separable data)
COXNET_L1_RATIO = 0.5


@dataclass(frozen=True)
class ClassicalModel:
    """A fitted penalized linear model and how its penalty was chosen.

    Attributes
    ----------
    kind
        ``"binary"``, ``"regression"`` or ``"survival"``.
    penalty
        The selected penalty strength: ``1 / C`` for logistic regression, ``alpha`` for ridge and
        for the elastic-net Cox model.
    val_metric
        The kind's primary metric on the validation split at that penalty (``nan`` when the split
        could not score any candidate and the default penalty was kept).
    validation
        ``(penalty, validation metric)`` for every candidate, strongest penalty first.
    """

    kind: str
    penalty: float
    val_metric: float
    validation: tuple[tuple[float, float], ...] = field(repr=False)
    pipeline: Pipeline = field(repr=False)

    @property
    def n_features(self) -> int:
        """The number of features the model was fitted on."""
        return int(self.pipeline[0].n_features_in_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` scores: the logit for binary, the value for regression, the log-risk for survival."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"X has shape {X.shape}; the model was fitted on {self.n_features} features "
                "(align X to the training feature list first)"
            )
        if self.kind == "binary":
            return self.pipeline.decision_function(X)
        if self.kind == "survival":
            return self.pipeline.predict(X, alpha=self.penalty)
        return self.pipeline.predict(X)

    @property
    def coefficients(self) -> np.ndarray:
        """``(n_features,)`` weights per unit of each original (unstandardized) feature."""
        scaler, estimator = self.pipeline[0], self.pipeline[-1]
        if self.kind == "survival":
            column = int(np.argmin(np.abs(estimator.alphas_ - self.penalty)))
            weights = estimator.coef_[:, column]
        else:
            weights = np.ravel(estimator.coef_)
        return weights / scaler.scale_


def fit_classical(
    kind: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
) -> ClassicalModel:
    """Fit the penalized linear model of a task kind, its penalty chosen on the validation split.

    Parameters
    ----------
    kind
        ``"binary"`` (0/1 labels), ``"regression"`` or ``"survival"``.
    X_train, X_val
        ``(n, n_features)`` features of the training and validation samples.
    y_train, y_val
        ``(n,)`` labels, or ``(n, 2)`` ``[time, event]`` for survival; rows with ``NaN`` are dropped.
    seed
        Seed of the solvers that use one (the default ones are deterministic).

    Returns
    -------
    ClassicalModel
        Fitted on the training split at the penalty with the best validation primary metric.
    """
    metric_name = primary_metric(kind)  # raises on an unknown kind
    metric = METRICS[kind][metric_name]
    X_train, y_train = _labelled(kind, X_train, y_train, "train")
    X_val, y_val = _labelled(kind, X_val, y_val, "val")
    if X_train.shape[1] != X_val.shape[1]:
        raise ValueError(f"X_train has {X_train.shape[1]} features but X_val has {X_val.shape[1]}; use the same panel")
    _check_trainable(kind, y_train)
    if kind == "survival":
        candidates = _coxnet_path(X_train, y_train)
    else:
        penalties = LOGISTIC_PENALTIES if kind == "binary" else RIDGE_PENALTIES
        candidates = [(p, _fit_one(kind, X_train, y_train, p, seed)) for p in penalties]
    validation = []
    for penalty, pipeline in candidates:
        model = ClassicalModel(kind, float(penalty), float("nan"), (), pipeline)
        validation.append((float(penalty), float(metric(y_val, model.predict(X_val)))))
    scores = np.array([score for _, score in validation])
    if np.isnan(scores).all():
        best = len(candidates) // 2
        logger.warning("%s: no penalty could be scored on the validation split; kept the middle of the grid", kind)
    else:
        best = int(np.nanargmax(scores))
    penalty, pipeline = candidates[best]
    logger.info("%s: penalty %.3g selected, validation %s %.3f", kind, penalty, metric_name, scores[best])
    return ClassicalModel(kind, float(penalty), float(scores[best]), tuple(validation), pipeline)


def _labelled(kind: str, X: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X_{split} has shape {X.shape}; expected (n_samples, n_features)")
    if kind == "survival" and (y.ndim != 2 or y.shape[1] != 2):
        raise ValueError(f"y_{split} has shape {y.shape}; a survival task needs (n, 2) [time, event]")
    if kind != "survival" and y.ndim != 1:
        raise ValueError(f"y_{split} has shape {y.shape}; a {kind} task needs (n,)")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X_{split} has {X.shape[0]} rows but y_{split} has {y.shape[0]}; pass one label per row")
    keep = ~np.isnan(y) if y.ndim == 1 else ~np.isnan(y).any(axis=1)
    return X[keep], y[keep]


def _check_trainable(kind: str, y: np.ndarray) -> None:
    if y.shape[0] < 2:
        raise ValueError(f"y_train has {y.shape[0]} labelled samples; a {kind} model needs at least 2")
    if kind == "binary" and np.unique(y).size != 2:
        raise ValueError(f"y_train holds the classes {np.unique(y).tolist()}; a binary model needs both 0 and 1")
    if kind == "survival" and not (y[:, 1] == 1).any():
        raise ValueError("y_train has no event (every sample censored); a Cox model needs at least one")


def _fit_one(kind: str, X: np.ndarray, y: np.ndarray, penalty: float, seed: int) -> Pipeline:
    if kind == "binary":
        estimator = LogisticRegression(C=1.0 / penalty, max_iter=2000, random_state=seed)
    else:
        estimator = Ridge(alpha=penalty, random_state=seed)
    return make_pipeline(StandardScaler(), estimator).fit(X, y)


def _coxnet_path(X: np.ndarray, y: np.ndarray) -> list[tuple[float, Pipeline]]:
    """One elastic-net Cox fit along its penalty path; each candidate predicts at its own alpha."""
    target = Surv.from_arrays(event=y[:, 1] == 1, time=y[:, 0])
    estimator = CoxnetSurvivalAnalysis(
        l1_ratio=COXNET_L1_RATIO, n_alphas=COXNET_N_ALPHAS, alpha_min_ratio=COXNET_MIN_RATIO
    )
    pipeline = make_pipeline(StandardScaler(), estimator).fit(X, target)
    return [(float(alpha), pipeline) for alpha in pipeline[-1].alphas_]
