"""One federated run of the consortium, top to bottom: plan -> lock -> state -> keys -> jobs -> compare ->
report and release.

``consortium run`` and ``consortium demo`` build a :class:`~consortium.run_plan.RunPlan` and call
:func:`run_consortium`. The jobs run on the plan's backend (:func:`consortium.backends.open_backend`),
one per seed and fold (:mod:`consortium.run_job`); the baselines, which need nothing from the jobs, are
computed meanwhile in a second process (:class:`~consortium.aside.Aside`). The report is built from what
the operator's server received (:mod:`consortium.results`), never from the sites' folders; only the
benchmark comparison (``--baselines``), which needs every member's data on one machine anyway, reads the
federated arm's test predictions the sites kept. What is released: :mod:`consortium.publish`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consortium import comparison
from consortium.aside import Aside
from consortium.audit import AuditLog
from consortium.backends.open import open_backend
from consortium.backends.threads import threads_each
from consortium.publish import publish, release_source
from consortium.report import build_report
from consortium.run_folder import check_run_folder, empty_for_force, run_lock
from consortium.run_job import JobContext, Progress, run_job
from consortium.run_plan import RepetitionSpec, RunPlan
from consortium.run_results import Repetition, RunResult, seed_summary
from consortium.run_state import RunState, config_record
from consortium.shared_model import ensure_experiment, tracking_uri_for
from consortium.warmup import Warmup
from schema.config import ConsortiumConfig, dump_config, load_config

log = logging.getLogger(__name__)


def run_consortium(
    plan: RunPlan, *, progress: Progress | None = None, status: Callable[[str], None] | None = None
) -> RunResult:
    """Run the plan's jobs, compare, release, write ``report.json`` into the plan's folder.

    ``progress`` is called with (rounds done, rounds, the sites' last records) as rounds complete;
    ``status`` with a short line before each long step (for the CLI). With ``resume`` finished jobs are
    not run again and an interrupted one continues after the last round its server stored
    (:mod:`consortium.run_state`); with ``force`` the folder is emptied first.
    """
    say = status or log.info
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, say=say):
        state = _run_state(plan, say=say)
        audit = AuditLog(out / "audit.jsonl")
        keys = plan.he_keys(audit) if plan.he else None
        tracking_uri = tracking_uri_for(plan.config, out=out)
        ensure_experiment(plan.config, tracking_uri=tracking_uri)
        warmup = Warmup()  # the report's modules, loaded while the simulator runs the first job
        with contextlib.ExitStack() as aside:  # the baselines' processes are stopped on the way out
            backend = aside.enter_context(
                open_backend(
                    plan.config, env=plan.env, workspace=out / "flare", keys=keys, started=warmup.start, kit=plan.kit
                )
            )
            context = JobContext(plan, state, audit, keys, backend, tracking_uri, progress, say)
            started = time.perf_counter()
            repetitions = [_repetition(context, spec, aside=aside) for spec in plan.repetitions()]
            seconds = time.perf_counter() - started
            warmup.wait()
            report = _report(context, repetitions, seconds=seconds)
            config, released = repetitions[0].config, repetitions[0].jobs[-1]
            return publish(report, released, config=config, out=out, audit=audit, settle=backend.settle)


def _repetition(context: JobContext, spec: RepetitionSpec, *, aside: contextlib.ExitStack) -> Repetition:
    """One repetition: its config written, its baselines started aside, then its jobs one by one."""
    plan = context.plan
    updates = {"training": {"seed": spec.training_seed}, "data": {"split_seed": spec.split_seed}}
    config = _write_config(plan, spec.config_file, updates=updates if spec.index else {})  # what its sites read
    baselines = None
    if plan.baselines:
        context.say("baselines (each member alone, all members pooled, penalized linear): in a second process")
        threads = threads_each(len(config.members) + 1)  # beside the members' processes
        folds = [job.fold for job in spec.jobs]
        passes = plan.rounds * config.training.local_epochs
        baselines = Aside(comparison.baseline_arms, config, folds, passes=passes, threads=threads, what="baselines")
        aside.callback(baselines.stop)
    jobs = tuple(run_job(context, job, config) for job in spec.jobs)
    return Repetition(spec=spec, config=config, jobs=jobs, baselines=baselines)


def _report(context: JobContext, repetitions: list[Repetition], *, seconds: float) -> dict[str, Any]:
    """The report of the first repetition's jobs, with the comparison, the seeds' spread and what is released."""
    plan, first = context.plan, repetitions[0]
    arms_by_seed = []
    if plan.baselines or plan.folds:
        context.say("comparison: the federated arm beside the baselines; intervals")
        arms_by_seed = [repetition.arms() for repetition in repetitions]
    report = build_report(
        first.config,
        first.jobs,
        env=plan.env,
        he=plan.he,
        seconds=seconds,
        arms=arms_by_seed[0] if arms_by_seed else None,
        tracking_uri=context.tracking_uri,
        folds=plan.folds,
    )
    if plan.seeds > 1 and arms_by_seed:
        report["seeds"] = seed_summary(first.config, arms_by_seed)
    report["continued"] = {
        key: [{"job_id": p.job_id, "rounds": [p.first_round, p.rounds_done - 1]} for p in parts]
        for key, parts in context.state.jobs.items()
        if len(parts) > 1
    }
    report["release"] = release_source(first.jobs, folds=plan.folds, seeds=plan.seeds)
    return report


def _run_state(plan: RunPlan, *, say: Callable[[str], None]) -> RunState:
    """The run folder's :class:`RunState`, checked once more now that this command holds the folder: the
    run to continue with ``resume``, else a new one (with ``force``, in the emptied folder)."""
    state = check_run_folder(plan.out, plan.arguments(), config=plan.config, resume=plan.resume, force=plan.force)
    if state is not None:
        return state
    if plan.force:
        empty_for_force(plan.out, say=say)
    return RunState.start(plan.out, plan.arguments(), config=config_record(plan.config))


def _write_config(plan: RunPlan, path: Path, *, updates: dict[str, dict]) -> ConsortiumConfig:
    """The config the sites read from ``path``: consortium.yaml as given, or a copy with the run's fold
    count and a repetition's seeds (``updates``)."""
    config = plan.config
    if path == config.source and not updates:
        return config
    data = config.data.model_copy(update={"folds": plan.folds, **updates.get("data", {})})
    training = config.training.model_copy(update=updates.get("training", {}))
    dump_config(config.model_copy(update={"training": training, "data": data}), path)
    return load_config(path)
