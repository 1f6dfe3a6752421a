"""``consortium feasibility``: one FLARE round in which each member counts a protocol on its own obs and
sends the count vector as a sum section (encrypted under HE); the server adds them, a member's custodian
opens the sum, and the release rules (small cells, complementary suppression, optional noise) apply
before anything is written.

Under HE only the total is released; without HE (where the operator reads every update anyway) each
member's counts are released beside it, under the same suppression, decided jointly with the total.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.audit import AuditLog
from consortium.run_folder import check_statistics_folder, empty_for_force, run_lock
from consortium.run_plan import RunPlan
from consortium.statistics_run import run_summed_job
from jobs.site_feasibility import COUNTS_KEY, member_obs
from models.enrollment import enrollment_scenarios
from omics.feasibility import check_obs, feasibility_layout, round_summed_counts, scenario_fractions
from omics.feasibility_release import release_feasibility, release_json
from schema.config import ConsortiumConfig
from schema.protocol import Protocol, ProtocolError, load_protocol
from schema.writes import atomic_write

log = logging.getLogger(__name__)

EVENT_FEASIBILITY_RELEASED = "feasibility_released"
PROTOCOL_FILE = "protocol.yaml"
DOCUMENT_FILE = "feasibility.json"


@dataclass
class FeasibilityResult:
    document: dict[str, Any]
    path: Path
    job_id: str


def check_protocol(config: ConsortiumConfig, path: Path) -> Protocol:
    """The protocol at ``path``, parsed (never evaluated) and checked against every member's obs that this
    machine can read (sim and POC: all of them); a :class:`ProtocolError` (exit 2) names the file and fix."""
    protocol = load_protocol(path)
    for member in config.members:
        if member.data is None or not Path(member.data).exists():
            log.info("member %s: its data is not on this machine; it checks the protocol itself", member.name)
            continue
        check_obs(member_obs(member.data, sample_column=member.sample_column), protocol, path=str(member.data))
    return protocol


def run_feasibility(
    plan: RunPlan, protocol_path: Path, *, status: Callable[[str], None] | None = None
) -> FeasibilityResult:
    """Run the feasibility job of ``plan`` (built with ``command="feasibility"``) for the protocol at
    ``protocol_path`` and write ``out/feasibility.json`` (what the release rules let out, and the
    enrollment scenarios when ``feasibility:`` gives screening capacities and a target)."""
    config, out, he, env = plan.config, plan.out, plan.he, plan.env
    say = status or log.info
    protocol = check_protocol(config, protocol_path)
    layout = feasibility_layout(protocol)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, say=say):
        check_statistics_folder(out, inputs=plan.inputs(), force=plan.force, command=plan.command)
        if plan.force:
            empty_for_force(out, say=say)
        counted = out / PROTOCOL_FILE  # what the members counted, kept with the run
        if Path(protocol_path).resolve() != counted.resolve():
            shutil.copyfile(protocol_path, counted)
        audit = AuditLog(out / "audit.jsonl")
        finished = run_summed_job(
            plan, audit, rounds=1, what="feasibility job: {members}, one round", say=say, feasibility=counted
        )
        records = {site: rows[-1] for site, rows in finished.results.records.items() if rows}
        digests = {site: row.get("layout_digest") for site, row in records.items()}
        if set(digests.values()) != {layout.digest()}:
            raise ProtocolError(f"the members counted different protocols (layout digests {digests}); run it again")
        total = round_summed_counts(finished.opened.feasibility[COUNTS_KEY])
        members = None if he else {site: records[site]["counts"] for site in sorted(records)}
        document = feasibility_document(config, protocol, layout, total, members=members)
        document.update(consortium=config.name, job_id=finished.job_id, env=env, he=he)
        path = atomic_write(out / DOCUMENT_FILE, json.dumps(document, indent=2, allow_nan=False))
        audit.append(
            EVENT_FEASIBILITY_RELEASED,
            job_id=finished.job_id,
            protocol=protocol.name,
            layout_digest=layout.digest(),
            members=sorted(records),
            member_tables=members is not None,
        )
    return FeasibilityResult(document=document, path=path, job_id=finished.job_id)


def feasibility_document(config: ConsortiumConfig, protocol: Protocol, layout, total, *, members=None) -> dict:
    """``feasibility.json``'s body: the released cells and, when the config's ``feasibility:`` section
    gives screening capacities and a target, the enrollment scenarios from the released total."""
    settings = config.feasibility
    release = release_feasibility(
        total,
        layout,
        min_cell_count=config.data.min_cell_count,
        members=members,
        noise_epsilon=settings.noise_epsilon if settings else None,
        seed=config.training.seed,
    )
    document = {"protocol": protocol.name, **release_json(release, layout), "enrollment": None}
    if settings and settings.screening_capacity and settings.target:
        fractions = scenario_fractions(release.total.values, layout)
        forecasts = enrollment_scenarios(
            settings.screening_capacity,
            fractions,
            consent_rate=settings.consent_rate,
            target=settings.target,
            rate_cv=settings.rate_cv,
            interval=settings.interval,
        )
        document["enrollment"] = {
            "model": "Poisson-gamma (Anisimov & Fedorov 2007), eligible fraction of the released total",
            "screening_capacity": dict(settings.screening_capacity),
            "consent_rate": settings.consent_rate,
            "rate_cv": settings.rate_cv,
            "eligible_fractions": fractions,
            "scenarios": [_finite(f.to_json()) for f in forecasts],
        }
    return document


def _finite(row: dict) -> dict:
    """A forecast as JSON: a time no site's rate ever reaches (``inf``) becomes ``null``."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
