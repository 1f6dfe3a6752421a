"""One job of a run on its backend, from its :class:`~consortium.run_plan.JobSpec` to a
:class:`~consortium.run_results.FinishedJob`.

A job whose every round is kept (it finished, or stopped after storing its last round) is read back
from the run folder, not run again. Otherwise it is submitted, continuing after the last round kept
(``--resume``); when a restarted member is back (POC) the backend ends it after its stored round and it
continues from the next with every member. An interrupted or failed job keeps what its server stored
(:mod:`consortium.run_state`) and says how to continue. A finished job's rounds are audited, its
aggregate opened.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from consortium.audit import EVENT_JOB_INTERRUPTED, AuditLog
from consortium.backends.base import Backend
from consortium.backends.logs import first_errors
from consortium.flare_env import FederatedRunError, JobInterrupted, JobOutcome, MemberRejoined
from consortium.job_audit import Submission, audit_rounds
from consortium.results import JobResults, read_job, read_records, release, round_digests
from consortium.run_plan import JobSpec, RunPlan
from consortium.run_results import FinishedJob
from consortium.run_state import JobPart, RunState, keep_part, kept_folder
from jobs.recipe import build_recipe
from schema.config import ConsortiumConfig
from schema.names import CLIENT_CONTEXT_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

PLAINTEXT_WARNING = (
    "plaintext aggregation (HE off): the operator reads each member's update and statistics as they arrive"
)
MASKED_WARNING = (
    "HE off, secure aggregation on: the operator reads only the sum of the members' masked updates "
    "(fixed point, 32 fractional bits), never one member's"
)


def plaintext_warning(config: ConsortiumConfig) -> str:
    """What the console says about a job without HE."""
    return MASKED_WARNING if config.secure_aggregation() else PLAINTEXT_WARNING


POLL_SECONDS = 1.0

Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class JobContext:
    """What every job of a run shares."""

    plan: RunPlan
    state: RunState
    audit: AuditLog
    keys: Path | None
    backend: Backend
    tracking_uri: str
    progress: Progress | None
    say: Callable[[str], None]


def run_job(context: JobContext, spec: JobSpec, config: ConsortiumConfig) -> FinishedJob:
    """Run (or read back) the job ``spec``, whose sites read ``config``."""
    plan, state, say = context.plan, context.state, context.say
    total, key = plan.rounds, spec.key
    first = state.next_round(key)
    if state.finished(key) or first >= total:  # every round kept: released, not run again
        how = "finished before" if state.finished(key) else "every round was stored before it stopped"
        say(f"job {key}: {how}, read from {kept_folder(plan.out, key)}")
        return read_kept(context, key, config)
    label = spec.label(folds=plan.folds, seeds=plan.seeds, first_round=first)
    he = "on" if plan.he else "off"
    masks = "on" if config.secure_aggregation() else "off"
    say(f"federated job{label}: {len(config.members)} members x {total} rounds in {plan.env} (HE {he}, masks {masks})")
    if not plan.he:
        say(plaintext_warning(config))
    while True:  # once, or again from the next round when a restarted member is back (POC)
        recipe = build_recipe(
            config,
            he=plan.he,
            config_path=config.source,
            outputs=spec.outputs,
            rounds=total,
            fold=spec.fold,
            tracking_uri=context.tracking_uri,
            first_round=first,
            resume_from=state.last_aggregate(plan.out, key) if first else None,
        )
        continuation = {"continues": state.jobs[key][-1].job_id, "first_round": first} if first else {}
        submission = Submission(config, plan.env, plan.he, total, spec.fold, context.keys, continuation)
        try:
            with watch_rounds(plan.out / "flare", total, context.progress, first_round=first):
                # audited as FLARE returns the job id, before any round: job_submitted precedes what follows
                context.backend.submit(
                    recipe,
                    rounds=total - first,
                    submitted=partial(submission.record, context.audit, backend=context.backend),
                )
                outcome = context.backend.wait(timeout=plan.timeout)
        except MemberRejoined as exc:
            first = _continue_with(context, spec, config, exc, first)
            if first < total:
                continue
            return read_kept(context, key, config)  # back once the last round was stored: nothing is left to run
        except (FederatedRunError, JobInterrupted) as exc:
            _keep_interrupted(context, spec, config, exc, first)
            raise
        return _finish(context, spec, config, outcome, first)


def read_kept(context: JobContext, key: str, config: ConsortiumConfig) -> FinishedJob:
    """A job whose every round is kept, read back from the run folder and released."""
    folder = kept_folder(context.plan.out, key)
    results = read_job(folder, config=config)
    outcome = JobOutcome(job_id=context.state.jobs[key][-1].job_id, result_dir=folder, logs=folder, kits={})
    check_finished(results, context.plan.rounds, outcome, config)
    return FinishedJob(outcome, results, open_aggregate(results, config, keys=context.keys))


def record_job(outcome: JobOutcome, config: ConsortiumConfig, audit: AuditLog, *, total: int, keys: Path | None):
    """A finished job run in one go (``consortium stats``): its rounds audited (its submission was audited
    as FLARE returned its id), what its server received read and its aggregate opened."""
    results = read_job(outcome.result_dir, config=config)
    check_finished(results, total, outcome, config)
    audit_rounds(audit, outcome.job_id, results, rounds=range(total), digests=round_digests(outcome.result_dir))
    return FinishedJob(outcome, results, open_aggregate(results, config, keys=keys))


def open_aggregate(results: JobResults, config: ConsortiumConfig, *, keys: Path | None):
    """Release a job's aggregate; under HE with the custodian's context from the run's key folder."""
    return release(results, config, client_context=keys / CLIENT_CONTEXT_FILE if keys else None)


def check_finished(results: JobResults, total: int, outcome: JobOutcome, config: ConsortiumConfig) -> None:
    """Members may drop out while ``training.min_members`` stay; fewer is an error naming the silent ones."""
    members = [m.name for m in config.members]
    dropped = results.dropped(members, total)
    rejoined = results.rejoined(members, total)
    for member, round_ in dropped.items():
        back = f", answered again from round {rejoined[member]}" if member in rejoined else ""
        log.warning("member %s dropped out in round %d of job %s%s", member, round_, outcome.job_id, back)
    finished = results.finished(members, total)
    if len(finished) < config.min_members():
        silent = ", ".join(f"{m} (silent from round {r})" for m, r in dropped.items() if m not in finished)
        raise FederatedRunError(
            f"job {outcome.job_id}: only {len(finished)} of {len(members)} members "
            f"finished all {total} rounds, fewer than training.min_members = {config.min_members()}; silent: "
            f"{silent}. See the logs under {outcome.logs}{first_errors(outcome.logs, outcome.job_id)}"
        )


def _finish(context: JobContext, spec: JobSpec, config: ConsortiumConfig, outcome: JobOutcome, first: int):
    """Keep a finished job's results in the run folder, audit its rounds, read every part of it and open it."""
    plan, total = context.plan, context.plan.rounds
    keep_part(
        context.state,
        plan.out,
        spec.key,
        source=outcome.result_dir,
        job_id=outcome.job_id,
        first_round=first,
        finished=True,
    )
    results = read_job(kept_folder(plan.out, spec.key), config=config)
    check_finished(results, total, outcome, config)
    digests = round_digests(outcome.result_dir)  # the server's, as each round completed
    audit_rounds(context.audit, outcome.job_id, results, rounds=range(first, total), digests=digests)
    return FinishedJob(outcome, results, open_aggregate(results, config, keys=context.keys))


def _keep_stored(
    context: JobContext, spec: JobSpec, config: ConsortiumConfig, exc: FederatedRunError | JobInterrupted, first: int
) -> JobPart | None:
    """Keep what an ended job's server stored and audit its rounds; the kept part, or ``None`` when it
    stored no round."""
    if not exc.job_id or exc.job_folder is None:
        return None
    out = context.plan.out
    part = keep_part(
        context.state, out, spec.key, source=exc.job_folder, job_id=exc.job_id, first_round=first, finished=False
    )
    if part is not None:
        kept = read_job(out / part.folder, config=config)
        digests = round_digests(exc.job_folder)
        audit_rounds(context.audit, part.job_id, kept, rounds=range(first, part.rounds_done), digests=digests)
    return part


def _audit_interrupted(context: JobContext, spec: JobSpec, part: JobPart, why: dict[str, str]) -> None:
    context.audit.append(
        EVENT_JOB_INTERRUPTED,
        job_id=part.job_id,
        fold=spec.fold,
        rounds_done=part.rounds_done,
        rounds=context.plan.rounds,
        **why,
    )


def _continue_with(
    context: JobContext, spec: JobSpec, config: ConsortiumConfig, exc: MemberRejoined, first: int
) -> int:
    """A restarted member is back (POC): keep the ended job's stored rounds; the round to continue at."""
    part = _keep_stored(context, spec, config, exc, first)
    if part is None:  # the rejoin watch waits for a stored round: not expected
        raise exc
    _audit_interrupted(context, spec, part, {"reason": "member_rejoined", "member": exc.member})
    context.say(
        f"{exc.member} is back: job {exc.job_id} ended after round {part.rounds_done - 1}; "
        f"continuing at round {part.rounds_done} with every member"
    )
    return part.rounds_done


def _keep_interrupted(
    context: JobContext, spec: JobSpec, config: ConsortiumConfig, exc: FederatedRunError | JobInterrupted, first: int
) -> None:
    """Keep what the interrupted job's server stored; say how to continue, in the error and the audit log."""
    part = _keep_stored(context, spec, config, exc, first)
    if part is None:
        return
    _audit_interrupted(context, spec, part, {"reason": "interrupted"} if isinstance(exc, JobInterrupted) else {})
    way = f"continue at round {part.rounds_done}"
    if part.rounds_done >= context.plan.rounds:
        way = "release them (every round was stored)"
    kept = (
        f"Rounds {first} to {part.rounds_done - 1} of job {part.job_id} are kept in {context.plan.out / part.folder}; "
        f"run the same command with --resume to {way}"
    )
    if isinstance(exc, JobInterrupted):
        exc.hint = kept
        return
    exc.args = (f"{exc}\n{kept}",)


@contextlib.contextmanager
def watch_rounds(folder: Path, total: int, progress: Progress | None, *, first_round: int = 0) -> Iterator[None]:
    """Report rounds as the server records the sites' results, from a thread, while the job runs (a job
    continuing an interrupted one starts at ``first_round``). A job that ends without an error has done
    every round: the last report says ``total`` of ``total`` (the thread looks once a second, and a POC
    server archives a finished job's folder, so its own last look may come before the last round)."""
    if progress is None:
        yield
        return
    done = threading.Event()
    seen: dict[str, Any] = {"rounds": -1, "sites": {}}
    earlier = frozenset(folder.rglob(PUBLISHED_FILE)) if folder.exists() else frozenset()  # other folds' jobs

    def show(finished: int, sites: dict) -> None:
        seen["rounds"], seen["sites"] = finished, sites or seen["sites"]
        with contextlib.suppress(Exception):  # a broken display must not break the run
            progress(finished, total, {"sites": seen["sites"]})

    def poll() -> None:
        records = read_records(folder, exclude=earlier) if folder.exists() else {}
        finished = first_round + min((len(r) for r in records.values()), default=0)
        if finished > seen["rounds"]:
            show(finished, {s: r[-1] for s, r in records.items() if r})

    def loop() -> None:
        while not done.wait(POLL_SECONDS):
            with contextlib.suppress(OSError):  # FLARE moves folders while this looks: look again
                poll()

    watcher = threading.Thread(target=loop, name="federated-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    with contextlib.suppress(OSError):
        poll()
    if seen["rounds"] < total:
        show(total, {})
