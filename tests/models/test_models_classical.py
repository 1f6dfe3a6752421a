from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.classical import LOGISTIC_PENALTIES, ClassicalModel, fit_classical
from models.metrics import primary_metric, task_metrics

CHANCE = {"binary": 0.5, "regression": 0.0, "survival": 0.5}


def splits(member, kind: str, *, n: int = 300, seed: int = 0):
    """Train, val and test ``(X, y)`` of one synthetic task (features 0-2 carry the signal, 10% labels missing)."""
    data, tasks = member(n=n, n_features=20, seed=seed, kinds=(kind,))
    return [(part.X, part.targets[tasks[0].name]) for part in (data.subset(s) for s in ("train", "val", "test"))]


@pytest.fixture(scope="module")
def fitted(member) -> dict[str, tuple[ClassicalModel, list]]:
    models = {}
    for kind in ("binary", "regression", "survival"):
        parts = splits(member, kind)
        (X_train, y_train), (X_val, y_val), _ = parts
        models[kind] = (fit_classical(kind, X_train, y_train, X_val, y_val, seed=0), parts)
    return models


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_selected_model_beats_chance_on_held_out_samples(fitted, kind):
    model, (_, _, (X_test, y_test)) = fitted[kind]
    assert np.isnan(y_test).any()  # missing labels in the split scored
    score = task_metrics(kind, y_test, model.predict(X_test))[primary_metric(kind)]
    assert score > CHANCE[kind] + 0.3
    assert model.predict(X_test).shape == (X_test.shape[0],)


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_penalty_is_the_best_on_validation(fitted, kind):
    model, (_, (X_val, y_val), _) = fitted[kind]
    scores = dict(model.validation)
    assert len(scores) > 5 and model.penalty in scores
    assert model.val_metric == max(scores.values())
    recomputed = task_metrics(kind, y_val, model.predict(X_val))[primary_metric(kind)]
    assert model.val_metric == pytest.approx(recomputed, abs=1e-12)


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_coefficients_recover_the_planted_signs(fitted, kind):
    # every outcome rises with f0 - f1 + 0.5 f2 (survival: shorter time, so higher risk)
    coefficients = fitted[kind][0].coefficients
    assert coefficients.shape == (20,)
    assert coefficients[0] > 0 > coefficients[1]
    assert np.abs(coefficients[:3]).min() > np.abs(coefficients[3:]).max()


@pytest.mark.parametrize(
    ("kind", "estimator"),
    [("binary", lambda p: LogisticRegression(C=1 / p, max_iter=2000)), ("regression", lambda p: Ridge(alpha=p))],
)
def test_model_is_fitted_on_the_labelled_training_samples_only(fitted, kind, estimator):
    model, ((X_train, y_train), _, (X_test, _)) = fitted[kind]
    labelled = ~np.isnan(y_train)
    X_train, X_test = X_train.astype(np.float64), X_test.astype(np.float64)
    reference = make_pipeline(StandardScaler(), estimator(model.penalty)).fit(X_train[labelled], y_train[labelled])
    prediction = reference.decision_function(X_test) if kind == "binary" else reference.predict(X_test)
    np.testing.assert_allclose(model.predict(X_test), prediction, rtol=1e-6, atol=1e-8)


def test_missing_survival_labels_are_dropped(member):
    (X_train, y_train), (X_val, y_val), (X_test, _) = splits(member, "survival", n=200, seed=3)
    assert np.isnan(y_train).any() and np.isnan(y_val).any()
    kept_train, kept_val = ~np.isnan(y_train).any(axis=1), ~np.isnan(y_val).any(axis=1)
    with_missing = fit_classical("survival", X_train, y_train, X_val, y_val)
    without = fit_classical("survival", X_train[kept_train], y_train[kept_train], X_val[kept_val], y_val[kept_val])
    assert with_missing.penalty == without.penalty
    np.testing.assert_array_equal(with_missing.predict(X_test), without.predict(X_test))


def test_unscorable_validation_keeps_the_middle_penalty(member, caplog):
    (X_train, y_train), (X_val, _), _ = splits(member, "binary", n=200)
    with caplog.at_level(logging.WARNING, logger="models.classical"):
        model = fit_classical("binary", X_train, y_train, X_val, np.ones(X_val.shape[0]))  # one class
    assert math.isnan(model.val_metric)
    assert model.penalty == LOGISTIC_PENALTIES[len(LOGISTIC_PENALTIES) // 2]
    assert "no penalty could be scored" in caplog.text


def test_bad_input_raises_clear_errors(member):
    (X_train, y_train), (X_val, y_val), _ = splits(member, "binary", n=100)
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'"):
        fit_classical("ordinal", X_train, y_train, X_val, y_val)
    with pytest.raises(ValueError, match="X_val has 20 rows but y_val has 19"):
        fit_classical("binary", X_train, y_train, X_val, y_val[:19])
    with pytest.raises(ValueError, match="X_train has 20 features but X_val has 19"):
        fit_classical("binary", X_train, y_train, X_val[:, :19], y_val)
    with pytest.raises(ValueError, match=r"y_train holds the classes \[1.0\]; a binary model needs both 0 and 1"):
        fit_classical("binary", X_train, np.ones_like(y_train), X_val, y_val)
    with pytest.raises(ValueError, match=r"y_train has shape \(60,\); a survival task needs \(n, 2\)"):
        fit_classical("survival", X_train, y_train, X_val, y_val)
    censored = np.c_[np.arange(1.0, 61.0), np.zeros(60)]
    with pytest.raises(ValueError, match="y_train has no event"):
        fit_classical("survival", X_train, censored, X_val, np.c_[np.arange(1.0, 21.0), np.ones(20)])
    model = fit_classical("binary", X_train, y_train, X_val, y_val)
    with pytest.raises(ValueError, match="fitted on 20 features"):
        model.predict(X_val[:, :5])
