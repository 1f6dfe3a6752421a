"""``consortium stats``: one FLARE job in which each member sends only its association statistics'
sufficient statistics (encrypted under HE); the server adds them, a member's custodian opens the sum."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from consortium.audit import EVENT_STATISTICS_RELEASED, AuditLog
from consortium.backends.open import open_backend
from consortium.job_audit import Submission, custodian_keys
from consortium.report import write_biomarker_tables
from consortium.run_folder import check_statistics_folder, empty_for_force, run_lock
from consortium.run_job import plaintext_warning, record_job
from consortium.run_plan import RunPlan
from consortium.run_results import FinishedJob
from consortium.shared_model import tracking_uri_for
from consortium.statistics_release import data_residency, statistics_entries
from jobs.recipe import build_recipe
from schema import settings
from schema.config import ConsortiumConfig
from schema.writes import atomic_write

log = logging.getLogger(__name__)


@dataclass
class StatisticsResult:
    statistics: dict[str, Any]
    path: Path
    tables: list[Path]
    job_id: str


def run_statistics(plan: RunPlan, *, status: Callable[[str], None] | None = None) -> StatisticsResult:
    """Run the statistics job of ``plan`` (built with ``command="stats"``).

    Writes ``out/statistics.json`` (per endpoint: the features sorted by p-value, and the markers: higher
    in the positive class, by statistic, scanpy's ``rank_genes_groups`` order) and one CSV per endpoint
    under ``out/statistics/``. The figures equal the pooled analysis stratified by member. A folder that
    holds an earlier run is refused unless ``force`` (which empties it first), as is one whose audit log
    does not verify, before anything runs.
    """
    config, out, he, env = plan.config, plan.out, plan.he, plan.env
    say = status or log.info
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, say=say):
        check_statistics_folder(out, inputs=plan.inputs(), force=plan.force, command=plan.command)  # again, locked
        if plan.force:
            empty_for_force(out, say=say)
        audit = AuditLog(out / "audit.jsonl")
        rounds = settings.statistics_rounds(config)
        steps = f"{rounds} rounds (Cox model of the covariates, then the tests)" if rounds > 1 else "one round"
        finished = run_summed_job(plan, audit, rounds=rounds, what=f"statistics job: {{members}}, {steps}", say=say)
        statistics = _statistics_document(config, finished, env=env, he=he)
        path = atomic_write(out / "statistics.json", json.dumps(statistics, indent=2, allow_nan=False))
        tables = write_biomarker_tables(finished.opened, out / "statistics", config=config)
        audit.append(
            EVENT_STATISTICS_RELEASED,
            job_id=finished.job_id,
            endpoints=sorted(statistics["endpoints"]),
            members=sorted(finished.results.records),
        )
    return StatisticsResult(statistics=statistics, path=path, tables=tables, job_id=finished.job_id)


def run_summed_job(
    plan: RunPlan,
    audit: AuditLog,
    *,
    rounds: int,
    what: str,
    say: Callable[[str], None],
    feasibility: Path | None = None,
) -> FinishedJob:
    """One job of summed sections only, no training (``consortium stats``; ``consortium feasibility`` with
    the protocol file to count): the custodian's keys under HE, the job on ``plan``'s backend, its
    submission and rounds audited, what the server received read and the sum opened. ``what`` names the
    job for the console (``{members}`` becomes the number of members)."""
    config, out, he, env = plan.config, plan.out, plan.he, plan.env
    keys = custodian_keys(config, out, audit) if he else None
    with open_backend(config, env=env, workspace=out / "flare", keys=keys) as backend:
        members = f"{len(config.members)} members"
        say(f"{what.format(members=members)} in {env} (HE {'on' if he else 'off'})")
        if not he:
            say(plaintext_warning(config))
        recipe = build_recipe(
            config,
            he=he,
            config_path=config.source,
            outputs=out / "sites",
            tracking_uri=tracking_uri_for(config, out=out),
            statistics_only=feasibility is None,
            feasibility=feasibility,
        )
        submission = Submission(config, env, he, rounds, None, keys)
        backend.submit(recipe, rounds=rounds, submitted=partial(submission.record, audit, backend=backend))
        return record_job(backend.wait(timeout=plan.timeout), config, audit, total=rounds, keys=keys)


def _statistics_document(config: ConsortiumConfig, finished, *, env: str, he: bool) -> dict:
    """What ``statistics.json`` holds; NaN (a feature no test could be made for) becomes ``null``."""
    return {
        "consortium": config.name,
        "job_id": finished.job_id,
        "env": env,
        "he": he,
        "method": "per-member sums added by the server; equal to the pooled analysis with member as a factor",
        "min_members": config.statistics_min_members(),
        "endpoints": statistics_entries(config, finished.opened.details, published=finished.results.records),
        "data_residency": data_residency(config, he=he),
    }
