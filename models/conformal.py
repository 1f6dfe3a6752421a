"""Split-conformal prediction intervals (regression) and sets (binary) around a trained model, with MAPIE.

The model is already trained (the released shared model); what conformal prediction adds is the
calibration: on samples the model never trained on (a member's validation split, which never leaves
the member) the conformity scores give an interval or set that holds the true value for at least
``level`` of new samples from the same distribution. MAPIE does the work; the "estimator" it wraps
returns predictions computed beforehand, so the network runs once per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mapie.classification import SplitConformalClassifier
from mapie.regression import SplitConformalRegressor
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

DEFAULT_LEVEL = 0.9
MIN_CALIBRATION = 10  # fewer labelled validation samples than this give no interval (it would be vacuous)


class _GivenRegression(RegressorMixin, BaseEstimator):
    """A fitted regressor whose input is its own prediction (one column)."""

    def fit(self, X, y=None):  # sklearn's protocol; the model is trained already
        self.fitted_ = True
        return self

    def predict(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64)[:, 0]


class _GivenProbability(ClassifierMixin, BaseEstimator):
    """A fitted binary classifier whose input is its own probability of class 1 (one column)."""

    def fit(self, X, y=None):  # sklearn's protocol; the model is trained already
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X) -> np.ndarray:
        p = np.clip(np.asarray(X, dtype=np.float64)[:, 0], 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64)[:, 0] >= 0.5).astype(int)


@dataclass
class Conformal:
    """A calibrated interval (regression) or set (binary) maker for one endpoint."""

    kind: str
    level: float
    n_calibration: int
    _mapie: object

    def interval(self, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Regression: ``(low, high)`` per sample around the predictions (the target's units)."""
        _, bounds = self._mapie.predict_interval(_column(predicted))
        return bounds[:, 0, 0], bounds[:, 1, 0]

    def prediction_set(self, probability: np.ndarray) -> np.ndarray:
        """Binary: ``(n, 2)`` booleans, whether class 0 and class 1 are in each sample's set."""
        _, sets = self._mapie.predict_set(_column(probability))
        return np.asarray(sets[:, :, 0], dtype=bool)

    def covers(self, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """Per sample with a label, whether its interval or set holds the true value."""
        truth = np.asarray(truth, dtype=np.float64)
        labelled = np.isfinite(truth)
        if self.kind == "regression":
            low, high = self.interval(np.asarray(predicted)[labelled])
            return (truth[labelled] >= low) & (truth[labelled] <= high)
        sets = self.prediction_set(np.asarray(predicted)[labelled])
        return sets[np.arange(labelled.sum()), truth[labelled].astype(int)]


def calibrate(kind: str, predicted: np.ndarray, truth: np.ndarray, *, level: float = DEFAULT_LEVEL) -> Conformal | None:
    """Calibrate on held-out ``predicted`` values (regression: target units; binary: probabilities) and
    their ``truth`` (NaN: unlabelled, skipped). ``None`` for survival or fewer than
    :data:`MIN_CALIBRATION` labelled samples."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: give a coverage between 0 and 1, e.g. 0.9")
    if kind not in ("regression", "binary"):
        return None
    truth = np.asarray(truth, dtype=np.float64)
    labelled = np.isfinite(truth)
    if labelled.sum() < MIN_CALIBRATION:
        return None
    X, y = _column(np.asarray(predicted)[labelled]), truth[labelled]
    if kind == "regression":
        mapie = SplitConformalRegressor(_GivenRegression().fit(X), confidence_level=level, prefit=True)
        mapie.conformalize(X, y)
    else:
        mapie = SplitConformalClassifier(_GivenProbability().fit(X), confidence_level=level, prefit=True)
        mapie.conformalize(X, y.astype(int))
    return Conformal(kind=kind, level=level, n_calibration=int(labelled.sum()), _mapie=mapie)


def _column(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)
