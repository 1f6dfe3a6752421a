"""Clinical model inputs (``panel.clinical``): check, encode and scale a member's obs columns.

Every member encodes the declared features the same way (:mod:`schema.clinical`): a numeric column as
itself, a categorical one as one 0/1 column per declared level (a level a member lacks is still a
column, all zeros), and with ``missing: indicator`` a 0/1 ``<column> (missing)`` column. A numeric
input is standardized with the training split's mean and SD, as an omics feature, and a missing value
is filled with that mean (0 after scaling); level and indicator columns stay 0/1 (mean 0, SD 1 in the
scaling record). Nothing is dropped silently: a value the declaration does not allow (text in a
numeric column, an undeclared level, a value outside the declared range, a missing value under
``missing: refuse``) is a finding of the contract, naming the column and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from omics.errors import FieldError
from schema.clinical import ClinicalFeature, input_kinds, input_names

log = logging.getLogger(__name__)

Problem = tuple[str, str, str]
"""``(field, problem, fix)`` of one finding."""


@dataclass(frozen=True)
class ClinicalBlock:
    """A member's encoded clinical inputs: ``values`` ``(n, c)`` float64 in :func:`schema.clinical.input_names`
    order, NaN where a numeric value is missing (filled by :func:`filled`); ``kinds`` per column."""

    names: list[str]
    kinds: list[str]
    values: np.ndarray

    @property
    def numeric(self) -> np.ndarray:
        return np.array([kind == "numeric" for kind in self.kinds], dtype=bool)


def check_clinical(obs: pd.DataFrame, clinical: Sequence[ClinicalFeature]) -> list[Problem]:
    """Every way ``obs`` breaks the declared clinical features; empty when it fits."""
    problems: list[Problem] = []
    for feature in clinical:
        problems += _feature_problems(obs, feature)
    return problems


def encode_clinical(obs: pd.DataFrame, clinical: Sequence[ClinicalFeature], *, path: str = "") -> ClinicalBlock:
    """The declared features of ``obs`` as model inputs (module docstring).

    Raises
    ------
    FieldError
        ``obs`` breaks a declaration (the first problem of :func:`check_clinical`, naming ``path``).
    """
    problems = check_clinical(obs, clinical)
    if problems:
        raise FieldError(*problems[0], path=path)
    columns = [np.zeros((len(obs), 0))]
    for feature in clinical:
        series = obs[feature.column]
        if feature.type == "numeric":
            values = _numbers(series).to_numpy(dtype=np.float64)
            missing = np.isnan(values)
            columns.append(values[:, None])
        else:
            text = _level_text(series)
            missing = series.isna().to_numpy()
            columns.append(np.stack([(text == level).to_numpy() & ~missing for level in feature.levels], axis=1))
        if feature.missing == "indicator":
            columns.append(missing[:, None])
    return ClinicalBlock(
        names=input_names(clinical),
        kinds=input_kinds(clinical),
        values=np.hstack([np.asarray(c, dtype=np.float64) for c in columns]),
    )


def clinical_scaling(block: ClinicalBlock, *, fit_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per clinical input, the ``(mean, SD)`` it is standardized with: a numeric input's over the measured
    values of ``fit_rows`` (the training split; default all samples, ``ddof=1``); level and indicator
    columns 0 and 1 (they stay 0/1)."""
    rows = np.ones(len(block.values), dtype=bool) if fit_rows is None else np.asarray(fit_rows, dtype=bool)
    mean, std = np.zeros(len(block.names)), np.ones(len(block.names))
    for j in np.flatnonzero(block.numeric):
        fit = block.values[rows, j]
        fit = fit[~np.isnan(fit)]
        if fit.size < 2:
            log.warning(
                "clinical input %s: %d measured training values; it is 0 after scaling", block.names[j], fit.size
            )
            continue
        mean[j], std[j] = fit.mean(), fit.std(ddof=1)
    return mean, std


def filled(block: ClinicalBlock, *, mean: np.ndarray) -> np.ndarray:
    """``block.values`` with each missing numeric value replaced by its input's ``mean`` (0 once scaled)."""
    return np.where(np.isnan(block.values), np.asarray(mean, dtype=np.float64)[None, :], block.values)


def _feature_problems(obs: pd.DataFrame, feature: ClinicalFeature) -> list[Problem]:
    name, field = feature.column, f"obs.{feature.column}"
    if name not in obs.columns:
        shown = ", ".join(map(str, obs.columns[:8])) + (" ..." if len(obs.columns) > 8 else "")
        return [
            (
                field,
                f"clinical feature '{name}' (panel.clinical) needs column '{name}' in obs; found: {shown or '(none)'}",
                f"add '{name}' to the member's obs, or remove it from panel.clinical in consortium.yaml",
            )
        ]
    series = obs[name]
    problems: list[Problem] = []
    missing = series.isna()
    if feature.type == "numeric":
        values = _numbers(series)
        text = missing.eq(False) & values.isna()
        if text.any():
            problems.append(
                (
                    field,
                    f"clinical feature '{name}' is numeric but holds {int(text.sum())} non-numeric values, e.g. "
                    f"{sorted(series[text].astype(str).unique())[:3]}",
                    "encode the column as numbers (leave a missing value empty), or declare it type: categorical "
                    "with its levels",
                )
            )
        infinite = np.isinf(values.fillna(0.0).to_numpy())
        if infinite.any():
            problems.append(
                (field, f"clinical feature '{name}' holds {int(infinite.sum())} infinite values", "give finite values")
            )
        if feature.range is not None:
            low, high = feature.range
            outside = values.notna() & ~infinite & ((values < low) | (values > high))
            if outside.any():
                problems.append(
                    (
                        field,
                        f"clinical feature '{name}': {int(outside.sum())} values outside the declared range "
                        f"[{low:g}, {high:g}], e.g. {sorted(values[outside].unique())[:3]}",
                        "correct the values (units?), or widen panel.clinical's range for it in consortium.yaml",
                    )
                )
    else:
        text = _level_text(series)
        undeclared = missing.eq(False) & ~text.isin(feature.levels)
        if undeclared.any():
            found = sorted(text[undeclared].unique())
            problems.append(
                (
                    field,
                    f"clinical feature '{name}' holds levels {found[:10]} in {int(undeclared.sum())} samples, not "
                    f"among the declared levels {feature.levels}",
                    f"recode them to a declared level, or add them to the levels of '{name}' in panel.clinical "
                    "(every member then gets their columns)",
                )
            )
    if feature.missing == "refuse" and missing.any():
        problems.append(
            (
                field,
                f"clinical feature '{name}' has {int(missing.sum())} missing values and declares missing: refuse",
                "fill them in the member's obs, or declare missing: indicator for it in panel.clinical "
                "(a 0/1 missing input, the value filled with the training mean)",
            )
        )
    return problems


def _numbers(series: pd.Series) -> pd.Series:
    if series.dtype == bool:
        return series.astype(np.float64)
    values = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
    return pd.to_numeric(values, errors="coerce").astype(np.float64)


def _level_text(series: pd.Series) -> pd.Series:
    """Values as the text levels are declared as: whole floats such as 2.0 read as '2'."""
    values = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
    if pd.api.types.is_float_dtype(values):
        numbers = values.to_numpy(dtype=np.float64)
        whole = np.isfinite(numbers) & (np.mod(numbers, 1) == 0)
        values = pd.Series(
            [str(int(v)) if w else str(v) for v, w in zip(numbers, whole, strict=True)], index=series.index
        )
    return values.astype(str)
