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


class Privacy(_Open):
    he: bool
    dp: bool
    shared: str


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
