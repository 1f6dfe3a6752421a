"""Binary labels as 0/1: numbers as they are, text or categories through the task's ``positive`` value.

Tasks are duck-typed as in :mod:`omics.contract`; a binary task may carry ``positive`` (the label
that means 1; every other non-missing label means 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from omics.errors import ContractError

POSITIVE_WORDS = frozenset(
    {
        "1", "yes", "y", "true", "t", "positive", "pos", "case", "event", "affected", "present",
        "responder", "response", "responded", "respond", "r", "cr", "pcr", "completeresponse", "sensitive",
        "relapse", "relapsed", "recurrence", "recurred", "progression", "progressed", "metastasis",
        "dead", "deceased", "died", "death", "mutant", "mutated", "mut", "disease", "diseased", "tumor", "tumour",
    }
)  # fmt: skip
"""Labels a reader takes to mean 1 (the class a binary endpoint predicts), compared without case, spaces,
'-' or '_': a text label column gets one of these suggested as ``positive``, never merely the first label."""


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
            raise LabelError(
                f"task '{task.name}': column '{task.column}' holds text labels {seen[:6]}, but a binary task "
                "without 'positive' needs 0/1",
                _positive_fix(task, seen),
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


def suggested_positive(labels: Sequence[Any]) -> Any | None:
    """The one label of ``labels`` that reads as the positive class (see :data:`POSITIVE_WORDS`), or
    ``None`` when none or several do (then the user is asked, not guessed for).

    >>> suggested_positive(["PD", "CR"]), suggested_positive(["no", "yes"]), suggested_positive(["A", "B"])
    ('CR', 'yes', None)
    """
    hits = [label for label in labels if _plain(label) in POSITIVE_WORDS]
    return hits[0] if len(hits) == 1 else None


def _positive_fix(task: Any, seen: list) -> str:
    where = f"task '{task.name}' in consortium.yaml"
    guess = suggested_positive(seen)
    if guess is not None:
        return (
            f"add `positive: {guess!r}` to {where} if {guess!r} is the class to predict (that label becomes 1, "
            "the others 0), or encode the column as 0/1"
        )
    return (
        f"add `positive:` to {where}, naming the label that means 1 (one of {seen[:6]}; the others become 0), "
        "or encode the column as 0/1"
    )


def _plain(label: Any) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def label_counts(path: str | Path, tasks: Sequence[Any]) -> dict[str, int]:
    """Per task, the size of its smallest class (binary), its events (survival) or its labels (regression).

    Reads only ``obs`` of the file (not the matrix), for checks made before a run starts.
    """
    obs = ad.read_h5ad(path, backed="r").obs
    counts = {}
    for task in tasks:
        if task.type == "binary":
            try:
                values = binary_labels(obs[task.column], task).dropna()
            except LabelError:
                values = pd.Series(dtype=float)  # check_member names the problem; no class has labels here
            counts[task.name] = int(min((values == 1).sum(), (values == 0).sum()))
        elif task.type == "survival":
            counts[task.name] = int((pd.to_numeric(obs[task.event], errors="coerce") == 1).sum())
        else:
            counts[task.name] = int(pd.to_numeric(obs[task.column], errors="coerce").notna().sum())
    return counts


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _values_seen(series: pd.Series) -> list:
    """Distinct labels, as plain Python values, in a stable order."""
    values = series.unique().tolist()
    return sorted(values, key=str)
