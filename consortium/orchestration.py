"""One federated run of the consortium, end to end: the job(s), the release, the comparison, the report.

``consortium run`` and ``consortium demo`` call :func:`run_consortium`. The report is built from what
the operator's server received (:mod:`consortium.results`), never from the sites' folders; only the
benchmark comparison (``baselines=True``), which needs every member's data on one machine anyway,
reads the federated arm's test predictions the sites kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consortium import comparison
from consortium.anndata_export import write_results_anndata
from consortium.aside import Aside
from consortium.audit import (
    EVENT_JOB_INTERRUPTED,
    EVENT_JOB_SUBMITTED,
    EVENT_KEYS_CREATED,
    EVENT_MODEL_RELEASED,
    EVENT_ROUND_COMPLETED,
    EVENT_STATISTICS_RELEASED,
    AuditLog,
)
from consortium.flare_env import (
    FederatedRunError,
    JobInterrupted,
    JobOutcome,
    MemberRejoined,
    first_errors,
    poc_system,
    run_poc,
    threads_each,
)
from consortium.plots import save_report_plots
from consortium.reaper import reaper_for
from consortium.report import build_report, write_biomarker_tables, write_report
from consortium.results import JobResults, Released, read_job, read_records, release, round_digests
from consortium.run_folder import (
    busy_error,
    check_audit_log,
    check_force,
    empty_for_force,
    lock_holder,
    refuse_earlier_run,
    run_lock,
)
from consortium.run_state import (
    STATE_FILE,
    ResumeError,
    RunState,
    config_record,
    job_key,
    keep_part,
    kept_folder,
)
from consortium.shared_model import ensure_experiment, log_shared_model, tracking_uri_for
from consortium.simulator import Ending, run_sim
from consortium.statistics_release import data_residency, statistics_entries
from consortium.warmup import Warmup
from jobs.published import json_safe
from jobs.recipe import build_recipe
from jobs.site_outputs import PREDICTIONS_FILE, read_predictions, site_folder
from omics.contract import label_counts
from provisioning.he_keys import create_keys, load_context, public_fingerprint
from schema import settings
from schema.config import ConsortiumConfig, dump_config, load_config
from schema.errors import UserError
from schema.names import CLIENT_CONTEXT_FILE, PUBLISHED_FILE, SERVER_CONTEXT_FILE
from schema.writes import atomic_write

log = logging.getLogger(__name__)

PLAINTEXT_WARNING = (
    "plaintext aggregation (HE off): the operator reads each member's update and statistics as they arrive"
)

Progress = Callable[[int, int, dict[str, Any]], None]
POLL_SECONDS = 1.0


class RunError(UserError):
    """A run could not be made as asked."""


@dataclass
class RunResult:
    report: dict[str, Any]
    report_path: Path
    markdown_path: Path
    job_ids: list[str]


def run_consortium(
    config: ConsortiumConfig,
    *,
    env: Literal["sim", "poc"],
    out: Path,
    rounds: int | None = None,
    baselines: bool = False,
    he: bool | None = None,
    folds: int | None = None,
    seeds: int = 1,
    progress: Progress | None = None,
    status: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
    resume: bool = False,
    force: bool = False,
) -> RunResult:
    """Run the federated job (one per fold with ``folds``), release it, compare, write ``out/report.json``.

    Parameters
    ----------
    he
        Encrypted aggregation; defaults to ``privacy.he.enabled``. The simulator cannot run it.
    folds
        Cross-validation over the federation (overrides ``data.folds``): K jobs, every sample a test
        sample once; figures come from the out-of-fold predictions.
    seeds
        Repeat the whole comparison with ``seeds`` training and split seeds (``training.seed + i``,
        ``data.split_seed + i``); the report's figures are the first repetition's, and ``report["seeds"]``
        holds every repetition's paired differences with their mean and standard deviation.
    status
        Called with a short line before each long step (for the CLI).
    resume
        Continue the run interrupted in ``out`` (same arguments, same config and data files): finished jobs
        are not run again, and an interrupted one continues after the last round its server stored
        (:mod:`consortium.run_state`).
    force
        Empty ``out`` first. Without ``resume`` or ``force`` a folder that holds an earlier run is refused
        (:mod:`consortium.run_folder`), as is one whose audit log does not verify, before anything runs.
    """
    he = encryption_for(config, env=env, he=he)
    folds = folds or config.data.folds
    check_folds(config, folds=folds)  # before anything is written
    say = status or (lambda line: log.info(line))
    out = Path(out).resolve()
    arguments = _run_arguments(config, env=env, rounds=rounds, he=he, folds=folds, seeds=seeds, baselines=baselines)
    if resume and not (out / STATE_FILE).exists():
        raise ResumeError(f"{out}: no run to resume here ({STATE_FILE} missing); run the command without --resume")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, say=say):
        state = _run_state(config, out=out, arguments=arguments, resume=resume, force=force, say=say)
        return _run_locked(
            config,
            env=env,
            out=out,
            rounds=rounds,
            baselines=baselines,
            he=he,
            folds=folds,
            seeds=seeds,
            progress=progress,
            say=say,
            timeout=timeout,
            state=state,
        )


def check_run_folder(
    config: ConsortiumConfig,
    *,
    env: Literal["sim", "poc"],
    out: Path,
    rounds: int | None = None,
    baselines: bool = False,
    he: bool | None = None,
    folds: int | None = None,
    seeds: int = 1,
    resume: bool = False,
    force: bool = False,
) -> None:
    """What :func:`run_consortium` refuses in ``out`` before it starts anything, checked here without
    writing (the CLI checks before it opens its console log): a live run holding the folder, an audit log
    that does not verify, an earlier run (without ``resume`` or ``force``), and with ``resume`` other
    arguments, another config or a changed data file."""
    he = encryption_for(config, env=env, he=he)
    folds = folds or config.data.folds
    out = Path(out).resolve()
    holder = lock_holder(out)
    if holder is not None:
        raise busy_error(out, holder)
    arguments = _run_arguments(config, env=env, rounds=rounds, he=he, folds=folds, seeds=seeds, baselines=baselines)
    _check_folder(config, out=out, arguments=arguments, resume=resume, force=force)


def check_statistics_folder(out: Path, *, config: ConsortiumConfig, force: bool = False) -> None:
    """What :func:`run_statistics` refuses in ``out`` before it starts anything, checked without writing."""
    out = Path(out).resolve()
    holder = lock_holder(out)
    if holder is not None:
        raise busy_error(out, holder)
    _check_statistics_folder(out, config=config, force=force)


def empty_run_folder(out: Path, *, config: ConsortiumConfig, say: Callable[[str], None]) -> None:
    """``--force`` for a caller that writes into ``out`` before the run (the CLI's console log): empty it now,
    holding its lock, and say so in one line."""
    out = Path(out).resolve()
    if not out.exists():
        return
    with run_lock(out, say=say):
        check_audit_log(out)  # a broken log is evidence: --force does not delete it either
        check_force(out, inputs=_inputs(config))
        empty_for_force(out, say=say)


def encryption_for(config: ConsortiumConfig, *, env: str, he: bool | None) -> bool:
    """``he``, by default ``privacy.he.enabled``; the simulator cannot run encrypted aggregation."""
    he = config.privacy.he.enabled if he is None else he
    if he and env == "sim":
        raise RunError(
            "privacy.he.enabled is true but the FLARE simulator cannot run encrypted aggregation (it needs "
            "startup kits holding the members' HE contexts); use --env poc, or --no-he for a plaintext quick look"
        )
    return he


def write_release(report: dict[str, Any], opened, *, config: ConsortiumConfig, out: Path) -> tuple[Path, Path]:
    """Everything a release writes into ``out``: :func:`write_release_files`, then report.json/report.md."""
    write_release_files(report, opened, config=config, out=out)
    return write_report(report, out)


def write_release_files(report: dict[str, Any], opened, *, config: ConsortiumConfig, out: Path) -> None:
    """The full biomarker tables, results.h5ad, and the plots (last: the volcano reads the full tables)."""
    write_biomarker_tables(opened, out / "biomarkers")
    write_results_anndata(opened, config=config, report=report, out=out)
    save_report_plots(out, report=json_safe(report))  # the PNGs researchers expect, under out/plots/


@dataclass
class StatisticsResult:
    statistics: dict[str, Any]
    path: Path
    tables: list[Path]
    job_id: str


def run_statistics(
    config: ConsortiumConfig,
    *,
    env: Literal["sim", "poc"],
    out: Path,
    he: bool | None = None,
    status: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
    force: bool = False,
) -> StatisticsResult:
    """``consortium stats``: one FLARE job in which each member sends only its association statistics'
    sufficient statistics (encrypted under HE); the server adds them, a member's custodian opens the sum.

    Writes ``out/statistics.json`` (per endpoint: the features sorted by p-value, and the markers: higher
    in the positive class, by statistic, scanpy's ``rank_genes_groups`` order) and one CSV per endpoint
    under ``out/statistics/``. The figures equal the pooled analysis stratified by member. A folder that
    holds an earlier run is refused unless ``force`` (which empties it first), as is one whose audit log
    does not verify, before anything runs.
    """
    he = encryption_for(config, env=env, he=he)
    say = status or (lambda line: log.info(line))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    endings: list[Ending] = []  # the simulator, left to end while the statistics are written
    with (
        run_lock(out, say=say),
        _statistics_folder(out, config=config, force=force, say=say),
        _ended_after(endings, workspace=out / "flare"),
    ):
        audit = AuditLog(out / "audit.jsonl")
        keys = _keys(config, out, audit) if he else None
        with _flare(config, env, out, keys=keys, endings=endings) as submit:
            rounds = settings.statistics_rounds(config)
            steps = f"{rounds} rounds (Cox model of the covariates, then the tests)" if rounds > 1 else "one round"
            say(f"statistics job: {len(config.members)} members, {steps} in {env} (HE {'on' if he else 'off'})")
            if not he:
                say(PLAINTEXT_WARNING)
            recipe = build_recipe(
                config,
                he=he,
                config_path=config.source,
                outputs=out / "sites",
                tracking_uri=tracking_uri_for(config, out=out),
                statistics_only=True,
            )
            submitted = partial(
                _audit_submitted, audit, config=config, env=env, he=he, total=rounds, fold=None, keys=keys
            )
            outcome = submit(recipe, timeout, rounds, submitted)
        outcome, results, opened = _record_job(outcome, config, audit, total=rounds, keys=keys)
        statistics = _statistics_document(config, opened, results, job_id=outcome.job_id, env=env, he=he)
        path = atomic_write(out / "statistics.json", json.dumps(statistics, indent=2, allow_nan=False))
        tables = write_biomarker_tables(opened, out / "statistics")
        audit.append(
            EVENT_STATISTICS_RELEASED,
            job_id=outcome.job_id,
            endpoints=sorted(statistics["endpoints"]),
            members=sorted(results.records),
        )
    return StatisticsResult(statistics=statistics, path=path, tables=tables, job_id=outcome.job_id)


def _statistics_document(config: ConsortiumConfig, opened, results, *, job_id: str, env: str, he: bool) -> dict:
    """What ``statistics.json`` holds; NaN (a feature no test could be made for) becomes ``null``."""
    return {
        "consortium": config.name,
        "job_id": job_id,
        "env": env,
        "he": he,
        "method": "per-member sums added by the server; equal to the pooled analysis with member as a factor",
        "min_members": config.statistics_min_members(),
        "endpoints": statistics_entries(config, opened.details, published=results.records),
        "data_residency": data_residency(config, he=he),
    }


@contextlib.contextmanager
def _statistics_folder(out: Path, *, config: ConsortiumConfig, force: bool, say: Callable[[str], None]):
    """Held by this command (:func:`run_lock`), ``out`` is checked again and, with ``force``, emptied."""
    _check_statistics_folder(out, config=config, force=force)
    if force:
        empty_for_force(out, say=say)
    yield


def _check_statistics_folder(out: Path, *, config: ConsortiumConfig, force: bool) -> None:
    if not out.exists():
        return
    check_audit_log(out)
    if force:
        check_force(out, inputs=_inputs(config))
    else:
        refuse_earlier_run(out, command="stats")


def _run_locked(config, *, baselines, **arguments) -> RunResult:
    """The run, with its baselines (which need nothing from the federated jobs) computed in a second
    process while the jobs run; that process is stopped on the way out, whatever happened."""
    aside: list[Aside] = []
    endings: list[Ending] = []  # the last simulator, left to end while the report is written
    try:
        with _ended_after(endings, workspace=Path(arguments["out"]) / "flare"):
            return _run_jobs(config, baselines=baselines, aside=aside, endings=endings, **arguments)
    finally:
        for work in aside:
            work.stop()


@contextlib.contextmanager
def _ended_after(endings: list[Ending], *, workspace: Path) -> Iterator[None]:
    """On the way out, the simulators in ``endings`` have ended: after a run that went well, once their
    jobs have ended (:meth:`Ending.finish`); after an error or an interrupt, at once. Should the command
    itself die (even by kill -9), a watchdog ends every FLARE process under ``workspace``."""
    with reaper_for(workspace):
        try:
            yield
        except BaseException:
            for ending in endings:
                ending.stop()
            raise
        for ending in endings:
            ending.finish()


def _run_jobs(
    config,
    *,
    env,
    out,
    rounds,
    baselines,
    he,
    folds,
    seeds,
    progress,
    say,
    timeout,
    state: RunState,
    aside: list[Aside],
    endings: list[Ending],
) -> RunResult:
    total = int(rounds or config.training.rounds)
    passes = total * config.training.local_epochs
    config = _run_config(config, out=out, folds=folds)
    audit = AuditLog(out / "audit.jsonl")
    keys = _keys(config, out, audit) if he else None
    tracking_uri = tracking_uri_for(config, out=out)
    ensure_experiment(config, tracking_uri=tracking_uri)
    fold_ids = list(range(folds)) if folds else [None]
    repetitions = []
    warmup = Warmup()  # the report's modules, loaded while the simulator runs the first job
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        flare: list[Callable] = []  # FLARE starts for the first job to run (none when --resume finds all done)

        def submit(recipe, timeout, rounds, submitted):
            if not flare:
                flare.append(stack.enter_context(_flare(config, env, out, keys=keys, endings=endings, warmup=warmup)))
            return flare[0](recipe, timeout, rounds, submitted)

        for index in range(seeds):
            run_config = config if index == 0 else _seeded_config(config, out=out, index=index)
            where = out if index == 0 else out / f"seed{index}"
            if baselines:
                say("baselines (each member alone, all members pooled, penalized linear): in a second process")
                threads = threads_each(len(config.members) + 1)  # beside the members' processes
                aside.append(
                    Aside(
                        comparison.baseline_arms, run_config, fold_ids, passes=passes, threads=threads, what="baselines"
                    )
                )
            outcomes = []
            for fold in fold_ids:
                key = job_key(index, fold)
                first = state.next_round(key)
                if state.finished(key) or first >= total:  # every round kept: released, not run again
                    how = "finished before" if state.finished(key) else "every round was stored before it stopped"
                    say(f"job {key}: {how}, read from {kept_folder(out, key)}")
                    outcomes.append(_read_kept(state, out, key, run_config, keys=keys, total=total))
                    continue
                label = f" (fold {fold + 1} of {folds})" if fold is not None else ""
                label += f" (seed {index + 1} of {seeds})" if seeds > 1 else ""
                label += f", continuing at round {first}" if first else ""
                mode = "on" if he else "off"
                say(f"federated job{label}: {len(config.members)} members x {total} rounds in {env} (HE {mode})")
                if not he:
                    say(PLAINTEXT_WARNING)
                job = dict(state=state, out=out, key=key, config=run_config, audit=audit, total=total, fold=fold)
                while True:  # once, or again from the next round when a restarted member is back (POC)
                    recipe = build_recipe(
                        run_config,
                        he=he,
                        config_path=run_config.source,
                        outputs=_outputs(where, fold),
                        rounds=total,
                        fold=fold,
                        tracking_uri=tracking_uri,
                        first_round=first,
                        resume_from=state.last_aggregate(out, key) if first else None,
                    )
                    # audited as FLARE returns the job id, before any round: job_submitted precedes what follows
                    submitted = partial(
                        _audit_submitted,
                        audit,
                        config=run_config,
                        env=env,
                        he=he,
                        total=total,
                        fold=fold,
                        keys=keys,
                        **_continuation(state, key, first),
                    )
                    try:
                        with _watch(out / "flare", total, progress, first_round=first):
                            outcome = submit(recipe, timeout, total - first, submitted)
                    except MemberRejoined as exc:
                        first = _continue_with(exc, first_round=first, say=say, **job)
                        if first < total:
                            continue
                        outcome = None  # back once the last round was stored: nothing is left to run
                    except (FederatedRunError, JobInterrupted) as exc:
                        _keep_interrupted(exc, first_round=first, **job)
                        raise
                    break
                if outcome is None:
                    outcomes.append(_read_kept(state, out, key, run_config, keys=keys, total=total))
                else:
                    outcomes.append(_finish_job(outcome, first_round=first, env=env, he=he, keys=keys, **job))
            repetitions.append((run_config, where, outcomes, aside[-1] if baselines else None))
    seconds = time.perf_counter() - started
    warmup.wait()
    arms_by_seed = []
    if baselines or folds:
        say("comparison: the federated arm beside the baselines; intervals")
        arms_by_seed = [
            _arms(c, where, fold_ids, baseline=work.result() if work else None) for c, where, _, work in repetitions
        ]
    outcomes = repetitions[0][2]
    arms = arms_by_seed[0] if arms_by_seed else None
    report = build_report(
        config, outcomes, env=env, he=he, seconds=seconds, arms=arms, tracking_uri=tracking_uri, folds=folds
    )
    if seeds > 1 and arms_by_seed:
        report["seeds"] = seed_summary(config, arms_by_seed)
    report["continued"] = {
        key: [{"job_id": p.job_id, "rounds": [p.first_round, p.rounds_done - 1]} for p in parts]
        for key, parts in state.jobs.items()
        if len(parts) > 1
    }
    write_release_files(report, outcomes[-1][2], config=config, out=out)
    for ending in endings:  # the simulator's tracking receiver has ended its runs in the same MLflow store
        ending.wait_ended()
    report["tracking"]["model_run_id"] = log_shared_model(
        config, outcomes[-1][2], report=report, tracking_uri=tracking_uri
    )
    report_path, md_path = write_report(report, out)
    audit.append(EVENT_MODEL_RELEASED, job_id=outcomes[-1][0].job_id, model_run_id=report["tracking"]["model_run_id"])
    return RunResult(
        report=report, report_path=report_path, markdown_path=md_path, job_ids=[o.job_id for o, _, _ in outcomes]
    )


def _record_job(outcome: JobOutcome, config: ConsortiumConfig, audit: AuditLog, *, total, keys):
    """Audit a finished job's rounds (its submission was audited as FLARE returned its id), read what its
    server received and open the aggregate."""
    results = read_job(outcome.result_dir, config=config)
    _check_finished(results, total, outcome, config)
    _audit_rounds(audit, outcome.job_id, results, rounds=range(total), digests=round_digests(outcome.result_dir))
    opened = _open(results, config, keys=keys)
    return outcome, results, opened


def _open(results: JobResults, config: ConsortiumConfig, *, keys: Path | None):
    """Release a job's aggregate; under HE with the custodian's context from the run's key folder."""
    return release(results, config, client_context=keys / CLIENT_CONTEXT_FILE if keys else None)


def _continuation(state: RunState, key: str, first_round: int) -> dict[str, Any]:
    """What a job that continues an interrupted one records in its ``job_submitted``."""
    return {"continues": state.jobs[key][-1].job_id, "first_round": first_round} if first_round else {}


def _audit_submitted(
    audit: AuditLog, job_id: str, *, config: ConsortiumConfig, env, he, total, fold, keys: Path | None, **more
) -> None:
    """The job's submission; under HE with the fingerprint of the public context its server was given."""
    fingerprint = public_fingerprint(load_context(keys / SERVER_CONTEXT_FILE)) if keys else None
    audit.append(
        EVENT_JOB_SUBMITTED,
        job_id=job_id,
        consortium=config.name,
        env=env,
        rounds=total,
        he=he,
        he_fingerprint=fingerprint,
        dp=config.privacy.dp.enabled,
        fold=fold,
        members=[m.name for m in config.members],
        **more,
    )


def _audit_rounds(
    audit: AuditLog, job_id: str, results: JobResults, *, rounds: range, digests: dict[int, dict] | None = None
) -> None:
    """One entry per round, with what the server recorded as it completed (``digests``: see
    :func:`consortium.results.round_digests`)."""
    for round_ in rounds:
        sites = sorted(s for s, records in results.records.items() if any(r.get("round") == round_ for r in records))
        audit.append(EVENT_ROUND_COMPLETED, job_id=job_id, round=round_, sites=sites, **(digests or {}).get(round_, {}))


def _run_arguments(config: ConsortiumConfig, *, env, rounds, he, folds, seeds, baselines) -> dict[str, Any]:
    """What ``--resume`` must be given again, as the run state records it."""
    total = int(rounds or config.training.rounds)
    return dict(config=str(config.source), env=env, rounds=total, he=he, folds=folds, seeds=seeds, baselines=baselines)


def _run_state(config, *, out: Path, arguments: dict, resume: bool, force: bool, say) -> RunState:
    """The run folder's :class:`RunState`, checked once more now that this command holds the folder: the
    run to continue with ``resume``, else a new one (with ``force``, in the emptied folder)."""
    state = _check_folder(config, out=out, arguments=arguments, resume=resume, force=force)
    if state is not None:
        return state
    if force:
        empty_for_force(out, say=say)
    return RunState.start(out, arguments, config=config_record(config))


def _check_folder(config, *, out: Path, arguments: dict, resume: bool, force: bool) -> RunState | None:
    """Everything refused before a run writes a file, in order: the audit log, then an earlier run (without
    ``resume`` or ``force``), or with ``resume`` other arguments, another config or a changed data file.
    The run state to continue with ``resume``."""
    if resume and force:
        raise RunError("--resume continues the run in --out and --force empties it first: give one of them")
    if resume and not (out / STATE_FILE).exists():
        raise ResumeError(f"{out}: no run to resume here ({STATE_FILE} missing); run the command without --resume")
    if not out.exists():
        return None
    check_audit_log(out)
    if force:
        check_force(out, inputs=_inputs(config))
        return None
    if not resume:
        refuse_earlier_run(out, command="run")
        return None
    state = RunState.load(out)
    state.check_arguments(arguments, out=out)
    state.check_config(config_record(config), out=out)
    return state


def _inputs(config: ConsortiumConfig) -> list[Path]:
    """The consortium's own files, which ``--force`` must never delete."""
    files = [config.source, config.panel.file, *(m.data for m in config.members)]
    return [Path(f) for f in files if f is not None]


def _keep_stored(exc: FederatedRunError, *, state, out, key, config, audit, total, fold, first_round, **why):
    """Keep what an ended job's server stored and audit it (``why``: what ended it); the kept part, or
    ``None`` when it stored no round."""
    part = None
    if exc.job_id and exc.job_folder is not None:
        part = keep_part(
            state, out, key, source=exc.job_folder, job_id=exc.job_id, first_round=first_round, finished=False
        )
    if part is None:
        return None
    kept = read_job(out / part.folder, config=config)
    digests = round_digests(exc.job_folder)
    _audit_rounds(audit, part.job_id, kept, rounds=range(first_round, part.rounds_done), digests=digests)
    audit.append(
        EVENT_JOB_INTERRUPTED, job_id=part.job_id, fold=fold, rounds_done=part.rounds_done, rounds=total, **why
    )
    return part


def _continue_with(exc: MemberRejoined, *, say, **job) -> int:
    """A restarted member is back (POC): keep the ended job's stored rounds; the round to continue at."""
    try:
        part = _keep_stored(exc, reason="member_rejoined", member=exc.member, **job)
    finally:
        shutil.rmtree(exc.job_folder, ignore_errors=True)  # the copy taken before the job was ended
    if part is None:  # RejoinWatch waits for a stored round: not expected
        raise exc
    say(
        f"{exc.member} is back: job {exc.job_id} ended after round {part.rounds_done - 1}; "
        f"continuing at round {part.rounds_done} with every member"
    )
    return part.rounds_done


def _keep_interrupted(exc: FederatedRunError | JobInterrupted, **job) -> None:
    """Keep what the interrupted job's server stored; say how to continue, in the error and the audit log."""
    why = {"reason": "interrupted"} if isinstance(exc, JobInterrupted) else {}
    part = _keep_stored(exc, **why, **job)
    if part is None:
        return
    first_round, out = job["first_round"], job["out"]
    way = f"continue at round {part.rounds_done}"
    if part.rounds_done >= job["total"]:
        way = "release them (every round was stored)"
    kept = (
        f"Rounds {first_round} to {part.rounds_done - 1} of job {part.job_id} are kept in {out / part.folder}; "
        f"run the same command with --resume to {way}"
    )
    if isinstance(exc, JobInterrupted):
        exc.hint = kept
        return
    exc.args = (f"{exc}\n{kept}",)


def _finish_job(outcome: JobOutcome, *, state, out, key, config, audit, total, fold, first_round, env, he, keys):
    """Keep a finished job's results in the run folder, audit it, read every part of it and open it."""
    keep_part(state, out, key, source=outcome.result_dir, job_id=outcome.job_id, first_round=first_round, finished=True)
    results = read_job(kept_folder(out, key), config=config)
    _check_finished(results, total, outcome, config)
    digests = round_digests(outcome.result_dir)  # the server's, as each round completed
    _audit_rounds(audit, outcome.job_id, results, rounds=range(first_round, total), digests=digests)
    opened = _open(results, config, keys=keys)
    return outcome, results, opened


def _read_kept(state: RunState, out: Path, key: str, config: ConsortiumConfig, *, keys: Path | None, total: int):
    """A job whose every round is kept (it finished, or stopped after storing its last round): read back from
    the run folder and released, not run again."""
    folder = kept_folder(out, key)
    results = read_job(folder, config=config)
    outcome = JobOutcome(job_id=state.jobs[key][-1].job_id, result_dir=folder, logs=folder, kits={})
    _check_finished(results, total, outcome, config)
    opened = _open(results, config, keys=keys)
    return outcome, results, opened


def seed_summary(config: ConsortiumConfig, arms_by_seed: list) -> dict[str, Any]:
    """Per member and endpoint, each repetition's paired differences and their mean and sd."""
    kinds = {name: info["type"] for name, info in config.endpoints().items()}
    per_seed = [comparison.member_figures(arms, kinds=kinds, seed=config.training.seed) for arms in arms_by_seed]
    summary: dict[str, Any] = {"n": len(arms_by_seed), "paired_differences": {}}
    for member, tasks in per_seed[0].items():
        for task in tasks:
            for key in tasks[task]["difference"]:
                values = [s[member][task]["difference"][key]["estimate"] for s in per_seed]
                summary["paired_differences"].setdefault(member, {}).setdefault(task, {})[key] = {
                    "values": values,
                    "mean": float(np.mean(values)),
                    "sd": float(np.std(values, ddof=1)),
                }
    return summary


def _seeded_config(config: ConsortiumConfig, *, out: Path, index: int) -> ConsortiumConfig:
    """The run's config with the training and split seeds moved by ``index`` (a repetition)."""
    training = config.training.model_copy(update={"seed": config.training.seed + index})
    data = config.data.model_copy(update={"split_seed": config.data.split_seed + index})
    path = out / f"consortium.seed{index}.yaml"
    dump_config(config.model_copy(update={"training": training, "data": data}), path)
    return load_config(path)


def check_folds(config: ConsortiumConfig, *, folds: int | None) -> None:
    """``folds`` must leave every fold a sample of each class (binary) and an event (survival)."""
    k = folds
    if not k:
        return
    for member in config.members:
        for task, smallest in label_counts(member.data, member.tasks).items():
            if smallest < k:
                raise RunError(
                    f"--folds {k}: member '{member.name}' endpoint '{task}' has only {smallest} samples in its "
                    f"smallest class (or events); every fold needs one. Use --folds {max(2, smallest)} or fewer"
                )


def _run_config(config: ConsortiumConfig, *, out: Path, folds: int | None) -> ConsortiumConfig:
    """The config the sites read: consortium.yaml as given, or a copy with the run's fold count."""
    if not folds or folds == config.data.folds:
        return config
    data = config.data.model_copy(update={"folds": folds})
    path = out / "consortium.run.yaml"
    dump_config(config.model_copy(update={"data": data}), path)
    return load_config(path)


def _keys(config: ConsortiumConfig, out: Path, audit: AuditLog) -> Path:
    """The key custodian's step, done here because one machine plays every role in a POC run."""
    folder = out / "he_keys"
    if (folder / CLIENT_CONTEXT_FILE).exists() and (folder / SERVER_CONTEXT_FILE).exists():
        audit.append("keys_reused", fingerprint=public_fingerprint(load_context(folder / SERVER_CONTEXT_FILE)))
    else:
        keyset = create_keys(config.privacy.he, out=folder)
        audit.append(EVENT_KEYS_CREATED, fingerprint=keyset.fingerprint, custodian="all roles on this machine (POC)")
    return folder


@contextlib.contextmanager
def _flare(
    config: ConsortiumConfig,
    env: str,
    out: Path,
    *,
    keys: Path | None,
    endings: list[Ending],
    warmup: Warmup | None = None,
) -> Iterator[Callable]:
    """What runs a job in ``env``. A simulator's own teardown goes on after its job's results are complete:
    its :class:`Ending` joins ``endings``, and is finished before the next simulator starts. ``warmup``
    starts once a simulator runs."""
    if env == "sim":

        def simulate(recipe, timeout, rounds, submitted=None):
            while endings:
                endings.pop().finish()
            started = warmup.start if warmup else None
            outcome, ending = run_sim(recipe, config, out / "flare", started=started, submitted=submitted)
            endings.append(ending)
            return outcome

        yield simulate
        return
    if env != "poc":
        raise RunError(f"env='{env}': use 'sim' (FLARE simulator) or 'poc' (a real server and clients)")
    with poc_system(config, out / "flare", keys=keys) as prod:

        def on_poc(recipe, timeout, rounds, submitted=None):
            return run_poc(recipe, config, prod, timeout=timeout, rounds=rounds, submitted=submitted)

        yield on_poc


def _outputs(out: Path, fold: int | None) -> Path:
    return out / "sites" if fold is None else out / "sites" / f"fold{fold}"


def _check_finished(results: JobResults, total: int, outcome: JobOutcome, config: ConsortiumConfig) -> None:
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


def _arms(config: ConsortiumConfig, out: Path, fold_ids: list, *, baseline: list | None):
    """Each fold's arms (``baseline``: the folds' baseline arms, or ``None``) with the federated test
    predictions the members kept, every fold's test samples in one set."""
    arms = comparison.ArmPredictions()
    for index, fold in enumerate(fold_ids):
        fold_arms = baseline[index] if baseline is not None else comparison.ArmPredictions()
        for member in config.members:
            folder = site_folder(_outputs(out, fold), member.name)
            if not (folder / PREDICTIONS_FILE).exists():
                log.warning("member %s kept no test predictions (it dropped out); no comparison for it", member.name)
                continue
            kept = read_predictions(folder)
            fold_arms.add("federated", member.name, kept["prediction"])
            fold_arms.targets.setdefault(member.name, kept["target"])
        arms.extend(fold_arms)
    return arms


@contextlib.contextmanager
def _watch(folder: Path, total: int, progress: Progress | None, *, first_round: int = 0) -> Iterator[None]:
    """Report rounds as the server records the sites' results, from a thread, while the job runs (a job
    continuing an interrupted one starts at ``first_round``)."""
    if progress is None:
        yield
        return
    done = threading.Event()
    seen = {"rounds": -1}
    earlier = frozenset(folder.rglob(PUBLISHED_FILE)) if folder.exists() else frozenset()  # other folds' jobs

    def poll() -> None:
        records = read_records(folder, exclude=earlier) if folder.exists() else {}
        finished = first_round + min((len(r) for r in records.values()), default=0)
        if finished > seen["rounds"]:
            seen["rounds"] = finished
            with contextlib.suppress(Exception):  # a broken display must not break the run
                progress(finished, total, {"sites": {s: r[-1] for s, r in records.items() if r}})

    def loop() -> None:
        while not done.wait(POLL_SECONDS):
            poll()

    watcher = threading.Thread(target=loop, name="federated-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def report_from_job(
    config: ConsortiumConfig,
    *,
    job_folder: Path,
    job_id: str,
    out: Path,
    client_context: Path | None,
    env: str = "kits",
    results: JobResults | None = None,
    opened: Released | None = None,
) -> RunResult:
    """``report.json`` / ``report.md`` of a job run anywhere, from the folder its server kept.

    ``job_folder`` is what ``nvflare job download`` (or the admin API) fetched; under HE,
    ``client_context`` is a member's secret context to open the aggregate with. ``results``: the
    folder as :func:`read_job` already read it, and ``opened``: its aggregate as :func:`release` opened
    it, if the caller has (then the aggregate is opened before ``out`` is made).
    """
    results = results if results is not None else read_job(job_folder, config=config)
    opened = opened if opened is not None else release(results, config, client_context=client_context)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    outcome = JobOutcome(job_id=job_id, result_dir=Path(job_folder), logs=Path(job_folder), kits={})
    tracking_uri = tracking_uri_for(config, out=out)
    ensure_experiment(config, tracking_uri=tracking_uri)
    report = build_report(
        config,
        [(outcome, results, opened)],
        env=env,
        he=client_context is not None,
        seconds=0.0,
        arms=None,
        tracking_uri=tracking_uri,
        folds=None,
    )
    # on kits the members' own runs are in the server's store: nest what they published under the release
    report["tracking"]["model_run_id"] = log_shared_model(
        config, opened, report=report, tracking_uri=tracking_uri, member_records=results.records
    )
    report_path, md_path = write_release(report, opened, config=config, out=out)
    AuditLog(out / "audit.jsonl").append(
        EVENT_MODEL_RELEASED, job_id=job_id, model_run_id=report["tracking"]["model_run_id"]
    )
    return RunResult(report=report, report_path=report_path, markdown_path=md_path, job_ids=[job_id])
