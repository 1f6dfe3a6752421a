"""The ``statistics:`` section of ``consortium.yaml``: the design of the federated association analysis.

Declared once, read by every member: covariates (numeric, or categorical with their levels, so every
member encodes them the same way), a Wilkinson formula, limma's ``eBayes`` options, the release rule
(a row needs ``min_members`` contributors) and subgroups by region. Member is always in the model as a
factor (each member is its own stratum in the Cox model): nobody writes it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENDPOINT_TERM = "endpoint"
"""The reserved name of the endpoint's values in a formula (``~ endpoint + age + sex``)."""
NUMERIC = "numeric"
_COLUMN = r"^[A-Za-z_][A-Za-z0-9_.]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Statistics(_Strict):
    """How each endpoint's features are tested: limma's linear model with a design, then empirical Bayes.

    >>> s = Statistics(covariates={"age": "numeric", "sex": ["F", "M"]}, formula="~ endpoint + age + sex")
    >>> s.covariates["sex"], s.min_members is None
    (['F', 'M'], True)
    >>> Statistics(covariates={"age": "numeric"}, formula="~ endpoint + bmi")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Statistics
    ...statistics.formula names ['bmi'], which are not declared covariates...
    """

    covariates: dict[str, Literal["numeric"] | list[str]] = Field(
        default_factory=dict,
        description="obs column -> 'numeric', or the list of its levels (the first is the reference).",
    )
    formula: str | None = Field(
        default=None,
        description="Wilkinson formula over 'endpoint' and the covariates (default: '~ endpoint + <covariates>').",
    )
    trend: bool = Field(default=False, description="limma-trend: the prior variance follows the average expression.")
    robust: bool = Field(default=False, description="eBayes(robust=TRUE): outlier variances get less shrinkage.")
    min_members: int | None = Field(
        default=None,
        ge=1,
        description="Contributors a released row of a shared endpoint needs (default: 3, or all members if fewer).",
    )
    by: Literal["region"] | None = Field(
        default=None, description="'region': effects per region, the endpoint x region interaction, Cochran's Q."
    )
    member_weights: bool = Field(
        default=False,
        description="Member-level precision weights (limma's arrayWeights by member): a noisier member's "
        "platform counts less; estimated over the rounds, three steps.",
    )
    cox_iterations: int = Field(
        default=8, ge=1, le=50, description="Newton steps of the federated Cox model of the covariates (one a round)."
    )

    @field_validator("covariates")
    @classmethod
    def _declared(cls, covariates: dict) -> dict:
        for name, kind in covariates.items():
            if not re.match(_COLUMN, name) or name == ENDPOINT_TERM:
                raise ValueError(
                    f"covariate {name!r}: use an obs column name of letters, digits, '_' or '.' other than "
                    f"'{ENDPOINT_TERM}' (rename the column in the member's file if needed)"
                )
            if isinstance(kind, list):
                levels = [str(level) for level in kind]
                if len(levels) < 2 or len(set(levels)) != len(levels):
                    raise ValueError(
                        f"covariate {name!r}: levels {kind} must be two or more distinct values (the first is the "
                        "reference); for a numeric column write 'numeric'"
                    )
        return covariates

    @model_validator(mode="after")
    def _formula_names_declared(self) -> Statistics:
        if self.formula is None:
            return self
        text = self.formula.strip()
        if not text.startswith("~"):
            raise ValueError(f"statistics.formula = {self.formula!r}: write it as '~ endpoint + ...'")
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", text))
        unknown = sorted(names - set(self.covariates) - {ENDPOINT_TERM})
        if unknown:
            raise ValueError(
                f"statistics.formula names {unknown}, which are not declared covariates; declare each under "
                f"statistics.covariates ('numeric' or its levels), or remove it from the formula"
            )
        if ENDPOINT_TERM not in names:
            raise ValueError(
                f"statistics.formula = {self.formula!r} lacks the term '{ENDPOINT_TERM}'; the endpoint is what is "
                "tested: write e.g. '~ endpoint + age + sex'"
            )
        return self

    def effective_formula(self) -> str:
        """The formula in force: the declared one, or ``~ endpoint + <covariates in declaration order>``."""
        if self.formula is not None:
            return self.formula.strip()
        return " + ".join(["~ " + ENDPOINT_TERM, *self.covariates])

    def numeric(self) -> tuple[str, ...]:
        return tuple(name for name, kind in self.covariates.items() if kind == NUMERIC)

    def categorical(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(str(v) for v in kind) for name, kind in self.covariates.items() if kind != NUMERIC}
