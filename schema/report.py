"""The ``report.json`` contract, as a typed model: what notebooks and downstream tools may rely on.

Validated before a report is written (:func:`consortium.report.write_report`). Nested figures are kept
open (``dict``) where their keys are endpoint or member names; the fields below are guaranteed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TaskFigures(_Open):
    type: str
    metric: str
    federated: float | None = None
    ci: dict[str, list[float | None] | None] = Field(default_factory=dict)
    local: float | None = None
    pooled: float | None = None
    linear_local: float | None = None
    linear_pooled: float | None = None


class MemberFigures(_Open):
    samples: dict[str, int] | None = None
    tasks: dict[str, TaskFigures]


class Endpoint(_Open):
    type: str
    metric: str
    members: list[str]
    shared: bool


class Biomarkers(_Open):
    statistics: dict[str, list[dict[str, Any]]]
    model: dict[str, list[dict[str, Any]]]
    consensus: list[dict[str, Any]]


class Quantization(_Open):
    """Secure aggregation without HE: values travel as fixed-point words modulo 2^64 (jobs.he.fixed_point)."""

    fraction_bits: int
    members: int
    error_bound_sum: float = Field(description="largest error of a summed value against the exact sum: n * 2^-(f+1)")
    value_limit: float = Field(description="largest |value| one member may send (the sum cannot wrap)")


class SecureAggregation(_Open):
    """Pairwise masks that cancel only in the sum (issue 26, docs/governance.md)."""

    enabled: bool
    why_off: str | None = None
    members_per_round: int = Field(description="the fewest members a round may have (training.min_members)")
    colluders_tolerated: int = Field(description="members that may join the operator and learn nothing more")
    threat_model: str
    aggregate_reveals: str
    quantization: Quantization | None = None


class Privacy(_Open):
    he: bool
    dp: bool
    shared: str
    secure_aggregation: SecureAggregation | None = Field(
        default=None, description="always written since secure aggregation exists; absent in older reports"
    )


class Timing(_Open):
    rounds: int
    seconds_total: float
    seconds_per_round: float
    bytes_received_per_round: int


class Report(_Open):
    """The whole ``report.json``."""

    consortium: str
    job_id: str
    env: str
    created: str
    members: dict[str, MemberFigures]
    endpoints: dict[str, Endpoint]
    definitions: dict[str, str]
    biomarkers: Biomarkers
    rounds: list[dict[str, Any]]
    privacy: Privacy
    timing: Timing
    tracking: dict[str, Any]
