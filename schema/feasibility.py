"""The ``feasibility:`` section of ``consortium.yaml``: release noise and the enrollment scenarios.

The small-cell rule itself is ``data.min_cell_count``, shared with every other count a member sends.

>>> f = Feasibility(screening_capacity={"pharma-a": 40, "pharma-b": 12.5}, consent_rate=0.6, target=120)
>>> f.noise_epsilon is None, f.rate_cv, f.interval
(True, 0.5, 0.9)
>>> f.check_members(["pharma-a"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: feasibility.screening_capacity names ['pharma-b'], which are not members...
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class Feasibility(BaseModel):
    """How protocol feasibility counts are released and how enrollment is forecast from them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_epsilon: float | None = Field(
        default=None,
        gt=0.0,
        description="Laplace noise on the released counts (epsilon per released table; stated in the report). "
        "None: exact counts, small cells suppressed.",
    )
    screening_capacity: dict[str, float] = Field(
        default_factory=dict,
        description="member -> patients a month the member's sites can screen (declared by the member).",
    )
    consent_rate: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of eligible patients who consent.")
    target: int | None = Field(default=None, ge=1, description="Patients to enroll; None: no enrollment forecast.")
    rate_cv: float = Field(
        default=0.5,
        ge=0.0,
        le=5.0,
        description="Coefficient of variation of a site's enrollment rate (the Poisson-gamma model's uncertainty; "
        "0: rates known exactly).",
    )
    interval: float = Field(default=0.9, gt=0.0, lt=1.0, description="Central interval of the time to target.")

    def check_members(self, members: Iterable[str]) -> None:
        """Every member named under ``screening_capacity`` is a member, and each capacity is >= 0."""
        members = list(members)
        unknown = sorted(set(self.screening_capacity) - set(members))
        if unknown:
            raise ValueError(
                f"feasibility.screening_capacity names {unknown}, which are not members (members: {members}); "
                "fix the names"
            )
        negative = {m: c for m, c in self.screening_capacity.items() if c < 0}
        if negative:
            raise ValueError(f"feasibility.screening_capacity {negative}: give patients a month, 0 or more")
