"""A run's release: the report built from its finished jobs, and everything written beside it.

What is released after ``--folds K``: cross-validation estimates the figures, out of fold over the K
jobs; the released model, its biomarker tables, ``results.h5ad``, the MLflow model and the
``model_released`` audit entry come from the last fold's job (trained on the other folds' samples, not
refit on every sample). ``report["release"]`` says so (:func:`release_source`), as does ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consortium.anndata_export import write_results_anndata
from consortium.audit import EVENT_MODEL_RELEASED, AuditLog
from consortium.flare_env import JobOutcome
from consortium.plots import save_report_plots
from consortium.report import build_report, write_biomarker_tables, write_report
from consortium.results import JobResults, Released, read_job, release
from consortium.run_results import FinishedJob, RunResult
from consortium.shared_model import ensure_experiment, log_shared_model, tracking_uri_for
from jobs.published import json_safe
from schema.config import ConsortiumConfig


def release_source(jobs: tuple[FinishedJob, ...], *, folds: int | None, seeds: int) -> dict[str, Any]:
    """Which job the released model and biomarker tables come from, in words a reader of the report needs."""
    released = jobs[-1]
    entry: dict[str, Any] = {"job_id": released.job_id, "fold": None}
    if folds:
        entry["fold"] = folds - 1
        entry["source"] = (
            f"fold {folds} of {folds} (job {released.job_id}): trained on the other {folds - 1} folds' samples; "
            f"the figures are out of fold over all {folds} jobs, the released model, biomarker tables, "
            "results.h5ad and MLflow model are this fold's (no refit on all samples)"
        )
    else:
        entry["source"] = (
            f"the run's job {released.job_id}: trained on each member's train split, tested on its held-out test split"
        )
    if seeds > 1:
        entry["source"] += f"; of the first of {seeds} repetitions (the others give the seeds' spread)"
    return entry


def write_release(report: dict[str, Any], opened, *, config: ConsortiumConfig, out: Path) -> tuple[Path, Path]:
    """Everything a release writes into ``out``: :func:`write_release_files`, then report.json/report.md."""
    write_release_files(report, opened, config=config, out=out)
    return write_report(report, out)


def write_release_files(report: dict[str, Any], opened, *, config: ConsortiumConfig, out: Path) -> None:
    """The full biomarker tables, results.h5ad, and the plots (last: the volcano reads the full tables)."""
    write_biomarker_tables(opened, out / "biomarkers", config=config)
    write_results_anndata(opened, config=config, report=report, out=out)
    save_report_plots(out, report=json_safe(report))  # the PNGs researchers expect, under out/plots/


def publish(
    report: dict[str, Any], released: FinishedJob, *, config: ConsortiumConfig, out: Path, audit: AuditLog, settle
) -> RunResult:
    """Release ``released`` with ``report``: the files, then (once ``settle`` returns: the last job's
    MLflow receiver has ended its runs in the same store) the MLflow model, report.json/report.md and the
    ``model_released`` audit entry."""
    write_release_files(report, released.opened, config=config, out=out)
    settle()
    tracking_uri = report["tracking"]["uri"]
    report["tracking"]["model_run_id"] = log_shared_model(
        config, released.opened, report=report, tracking_uri=tracking_uri
    )
    report_path, md_path = write_report(report, out)
    audit.append(EVENT_MODEL_RELEASED, job_id=released.job_id, model_run_id=report["tracking"]["model_run_id"])
    return RunResult(report=report, report_path=report_path, markdown_path=md_path, job_ids=list(report["job_ids"]))


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
    job = FinishedJob(outcome, results, opened)
    report = build_report(
        config,
        [job],
        env=env,
        he=client_context is not None,
        seconds=0.0,
        arms=None,
        tracking_uri=tracking_uri,
        folds=None,
    )
    report["release"] = release_source((job,), folds=None, seeds=1)
    # on kits the members' own runs are in the server's store: nest what they published under the release
    report["tracking"]["model_run_id"] = log_shared_model(
        config, opened, report=report, tracking_uri=tracking_uri, member_records=results.records
    )
    report_path, md_path = write_release(report, opened, config=config, out=out)
    AuditLog(out / "audit.jsonl").append(
        EVENT_MODEL_RELEASED, job_id=job_id, model_run_id=report["tracking"]["model_run_id"]
    )
    return RunResult(report=report, report_path=report_path, markdown_path=md_path, job_ids=[job_id])
