"""``panel.clinical``: obs columns that are model inputs beside (or instead of) the omics panel.

A clinical feature is numeric (standardized with the training split's mean and SD, as an omics feature)
or categorical with declared levels (one 0/1 column per level, the same columns at every member, so a
member lacking a level still has its column). A missing value follows a declared rule: ``refuse`` (the
contract refuses the file) or ``indicator`` (a 0/1 ``<column> (missing)`` input, and the numeric value
filled with the training split's mean, i.e. 0 after scaling); it is never dropped silently.

The model's inputs are the omics panel's features, then each clinical feature's columns in declaration
order (:func:`input_names`): ``age``; ``sex=F``, ``sex=M``; ``age (missing)`` after its feature's columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MISSING_SUFFIX = " (missing)"


class ClinicalFeature(BaseModel):
    """One obs column used as a model input.

    >>> ClinicalFeature(column="sex", type="categorical", levels=["F", "M"], missing="indicator").input_names()
    ['sex=F', 'sex=M', 'sex (missing)']
    >>> ClinicalFeature(column="age", type="numeric", range=[18, 100]).input_names()
    ['age']
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1, description="The obs column (the same name at every member).")
    type: Literal["numeric", "categorical"]
    levels: list[str] | None = Field(
        default=None, description="Categorical: every level, in order; one 0/1 model input per level."
    )
    range: tuple[float, float] | None = Field(
        default=None, description="Numeric: the plausible [low, high]; a value outside is a contract error."
    )
    missing: Literal["refuse", "indicator"] = Field(
        default="refuse",
        description="'refuse': a missing value is a contract error; 'indicator': a 0/1 '<column> (missing)' "
        "input, and a numeric value filled with the training split's mean.",
    )

    @model_validator(mode="before")
    @classmethod
    def _levels_as_text(cls, raw):
        # YAML reads `levels: [0, 1]` or `[yes, no]` as numbers or booleans; obs values are matched as text
        if isinstance(raw, dict) and isinstance(raw.get("levels"), list):
            raw = {**raw, "levels": [_level_text(level) for level in raw["levels"]]}
        return raw

    @model_validator(mode="after")
    def _fits_its_type(self) -> ClinicalFeature:
        where = f"clinical feature '{self.column}'"
        if self.type == "categorical":
            if self.levels is None:
                raise ValueError(f"{where} is categorical: declare its levels (e.g. levels: [F, M])")
            if len(self.levels) < 2 or len(set(self.levels)) != len(self.levels):
                raise ValueError(f"{where}: levels {self.levels} need two or more distinct values")
            if self.range is not None:
                raise ValueError(f"{where} is categorical: remove 'range' (it is for numeric features)")
        else:
            if self.levels is not None:
                raise ValueError(f"{where} is numeric: remove 'levels', or make it type: categorical")
            if self.range is not None and not self.range[0] < self.range[1]:
                raise ValueError(f"{where}: range {list(self.range)} must be [low, high] with low < high")
        return self

    def input_names(self) -> list[str]:
        """The model inputs this feature becomes, in order."""
        names = [self.column] if self.type == "numeric" else [f"{self.column}={level}" for level in self.levels or []]
        return names + ([self.column + MISSING_SUFFIX] if self.missing == "indicator" else [])

    def input_kinds(self) -> list[str]:
        """Per input of :meth:`input_names`: ``numeric`` (standardized), ``level`` or ``indicator`` (0/1)."""
        kinds = ["numeric"] if self.type == "numeric" else ["level"] * len(self.levels or [])
        return kinds + (["indicator"] if self.missing == "indicator" else [])


def input_names(clinical: Sequence[ClinicalFeature]) -> list[str]:
    """The model inputs of the clinical features, in declaration order."""
    return [name for feature in clinical for name in feature.input_names()]


def input_kinds(clinical: Sequence[ClinicalFeature]) -> list[str]:
    """:meth:`ClinicalFeature.input_kinds` of every feature, in :func:`input_names` order."""
    return [kind for feature in clinical for kind in feature.input_kinds()]


def _level_text(level) -> str:
    """A declared level as text: ``True`` -> ``'True'``, ``2.0`` -> ``'2'`` (as obs values are matched)."""
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level)
