"""Binary labels as 0/1: numbers as they are, text or categories through the task's ``positive`` value.

Tasks are duck-typed as in :mod:`omics.contract`; a binary task may carry ``positive`` (the label
that means 1; every other non-missing label means 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from omics.errors import ContractError


class LabelError(ContractError):
    """A binary task's labels cannot be read as 0/1; ``problem`` and ``fix`` are the two halves of the message."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


def binary_labels(series: pd.Series, task: Any) -> pd.Series:
    """``series`` as floats: 1 (positive), 0 (negative), NaN (missing).

    Without ``task.positive`` the labels must be numbers or booleans; with it, the labels equal to
    ``positive`` are 1 and the others 0 (one versus the rest).

    Raises
    ------
    LabelError
        Text labels without ``positive``, or a ``positive`` that no sample carries.
    """
    positive = getattr(task, "positive", None)
    present = series.notna()
    seen = _values_seen(series[present])
    if positive is None:
        if series.dtype == bool:
            return series.astype(float)
        values = pd.to_numeric(series, errors="coerce")
        text = present & values.isna()
        if text.any():
            example = seen[0] if seen else "yes"
            raise LabelError(
                f"task '{task.name}': column '{task.column}' holds text labels {seen[:6]}, but a binary task "
                "without 'positive' needs 0/1",
                f"add `positive: {example!r}` to task '{task.name}' in consortium.yaml (that label becomes 1, "
                "the others 0), or encode the column as 0/1",
            )
        return values.astype(float)
    if _is_number(positive) and pd.api.types.is_numeric_dtype(series) and series.dtype != bool:
        hits = pd.to_numeric(series, errors="coerce") == float(positive)
    else:
        hits = series.astype(str) == str(positive)
    if not (hits & present).any():
        raise LabelError(
            f"task '{task.name}': positive {positive!r} is not among the labels of column '{task.column}' {seen[:6]}",
            f"set `positive:` of task '{task.name}' to one of {seen[:6]} (quote it in YAML)",
        )
    return pd.Series(np.where(present, hits.astype(float), np.nan), index=series.index, dtype=float)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _values_seen(series: pd.Series) -> list:
    """Distinct labels, as plain Python values, in a stable order."""
    values = series.unique().tolist()
    return sorted(values, key=str)
