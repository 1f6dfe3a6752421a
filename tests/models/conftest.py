"""Small synthetic members for the models tests: a few planted features drive every outcome."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from models.data import MemberData, TaskSpec

SMALL_NETWORK = {"trunk_widths": (16, 8), "head_width": 8, "dropout": 0.0}


def synthetic_member(
    *,
    n: int = 200,
    n_features: int = 12,
    seed: int = 0,
    kinds: tuple[str, ...] = ("binary", "regression", "survival"),
    prefix: str = "",
    missing: float = 0.1,
) -> tuple[MemberData, list[TaskSpec]]:
    """Features 0-2 drive every task (``f0 - f1 + 0.5 f2``); 60/20/20 train/val/test split."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    signal = X[:, 0] - X[:, 1] + 0.5 * X[:, 2]
    targets: dict[str, np.ndarray] = {}
    tasks: list[TaskSpec] = []
    for kind in kinds:
        name = f"{prefix}{kind}"
        if kind == "binary":
            y = (signal + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
        elif kind == "regression":
            y = 3.0 * signal + 10.0 + 0.3 * rng.normal(size=n)
        else:
            time = np.exp(-signal + 0.3 * rng.normal(size=n))
            event = (rng.random(n) < 0.8).astype(np.float64)
            y = np.c_[time, event]
        y = y.astype(np.float64)
        y[rng.random(n) < missing] = np.nan
        targets[name] = y
        tasks.append(TaskSpec(name, kind))
    split = np.array(["train"] * int(0.6 * n) + ["val"] * int(0.2 * n))
    split = np.r_[split, ["test"] * (n - split.size)]
    data = MemberData(X=X, targets=targets, split=split, feature_names=[f"f{i}" for i in range(n_features)])
    return data, tasks


@pytest.fixture(scope="session")
def member() -> Callable[..., tuple[MemberData, list[TaskSpec]]]:
    """Factory of synthetic members (see :func:`synthetic_member`)."""
    return synthetic_member


@pytest.fixture
def small_network() -> dict:
    """MultitaskNet keyword arguments small enough for fast CPU tests."""
    return dict(SMALL_NETWORK)
