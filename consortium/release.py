"""Release a job run on provisioned kits: download it with a lead's admin kit, open the aggregate with a
member's secret context, write the report, register the model, and record it all in the audit log.

``consortium release`` (and ``consortium report --job``, the same code path) call :func:`release_job`.
Before anything is written, the job is checked: the folder holds exactly one job's server run folder,
its ``meta.json`` names the ``--job`` given, the aggregate and the published records are the bytes the
server recorded in its ``digests.jsonl``, the custodian's key is the one the aggregate was encrypted for,
and the counts opened from it are plausible. Any of these failing is an
:class:`~consortium.results.IntegrityError` (exit 1) naming what differs, and ``--out`` stays as it was:
no audit entry, no MLflow store, no file.

The audit log (``<out>/audit.jsonl``) then gets the job's submission (who, when, from the job's own
``meta.json``, the key fingerprint, and the sha256 of the server's own ``audit.log`` of the job, so that
NVFlare's record is chained into ours), one entry per round the server completed (with the digests it
recorded), and the release.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from consortium.audit import EVENT_JOB_SUBMITTED, EVENT_ROUND_COMPLETED, AuditLog
from consortium.audit.chain import links_to
from consortium.publish import report_from_job
from consortium.results import (
    IntegrityError,
    JobResults,
    Released,
    ResultsError,
    read_job,
    release,
    round_digests,
    verify_digests,
)
from consortium.run_results import RunResult
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import CLIENT_CONTEXT_FILE, GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
SERVER_AUDIT_FILE = "audit.log"  # NVFlare's per-site audit log, in the job's server workspace
JOB_META_FILE = "meta.json"


def download_job(job_id: str, *, kit: Path, username: str | None = None) -> Path:
    """Download a finished job with a lead's (or the operator's) admin kit into the kit's transfer folder;
    returns its folder. The user name defaults to the kit folder's name (provisioning names it so)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = Path(kit)
    if not (kit / "startup").is_dir():
        raise UserError(f"--kit {kit}: not an admin startup kit (no startup/ folder); give a lead's kit folder")
    user = username or kit.name
    try:
        session = new_secure_session(user, str(kit), timeout=60)
    except Exception as exc:
        raise UserError(f"--kit {kit}: cannot log in as '{user}' ({exc}); give the admin kit of a lead") from None
    try:
        return Path(session.download_job_result(job_id))
    except Exception as exc:
        raise UserError(f"job {job_id}: cannot download it with {kit} ({exc}); only its org's lead may") from None
    finally:
        session.close()


def secret_context_file(keys: Path) -> Path:
    """``--keys``: the custodian's secret context file, or a folder holding it (a key folder, a member kit)."""
    keys = Path(keys)
    candidates = [keys] if keys.is_file() else [keys / CLIENT_CONTEXT_FILE, keys / "startup" / CLIENT_CONTEXT_FILE]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(
            f"--keys {keys}: no {CLIENT_CONTEXT_FILE} there; give the member key custodian's secret context "
            f"(its keys folder, or a member kit's startup/{CLIENT_CONTEXT_FILE})"
        )
    return found


def release_job(
    config: ConsortiumConfig,
    *,
    job_id: str,
    out: Path,
    kit: Path | None = None,
    job_dir: Path | None = None,
    keys: Path | None = None,
) -> RunResult:
    """Download (``kit``) or read (``job_dir``) the job, check it, release it into ``out``; see the module
    docstring."""
    if (kit is None) == (job_dir is None):
        raise UserError("give either --kit LEAD_KIT (download the job) or --job-dir FOLDER (already downloaded)")
    context = secret_context_file(keys) if keys is not None else None
    folder = Path(job_dir).resolve() if job_dir is not None else download_job(job_id, kit=kit).resolve()
    run = job_run_folder(folder)
    if run is not None:
        check_job_id(job_id, run=run, root=folder)
        verify_digests(run)  # before a record is parsed: an edited file is named, never half-read
    results = read_job(run or folder, config=config)  # a folder with no job's records is refused here
    if results.global_model is None:
        raise ResultsError(f"{folder}: job {job_id} stored no aggregate; did it finish its last round?")
    opened = release(results, config, client_context=context)  # the key's fingerprint, then plausible counts
    # every check passed: only now is anything written
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(out / AUDIT_FILE, follows=links_to(kit, keys))  # chained to the kits' and keys' logs
    _audit_job(audit, config, job_id=job_id, folder=folder, run=run, results=results, opened=opened)
    result = report_from_job(
        config, job_folder=folder, job_id=job_id, out=out, client_context=context, results=results, opened=opened
    )
    log.info("released job %s into %s", job_id, out)
    return result


def job_run_folder(folder: Path) -> Path | None:
    """The one job under ``folder``: the server's run folder holding its ``published.jsonl`` (``None`` when
    there is none: :func:`consortium.results.read_job` says what is missing). A folder holding several
    jobs (a whole run folder: the simulator's workspace and the run's kept copies, several folds) is
    refused with the list, since their records would be read as one job's."""
    if not folder.is_dir():
        return None
    runs = sorted({path.parent for path in folder.rglob(PUBLISHED_FILE)})
    strays = sorted(p.parent for p in folder.rglob(GLOBAL_MODEL_FILE) if not any(r in p.parents for r in runs))
    found = runs + strays
    if len(found) > 1:
        listed = "\n".join(f"  {path}" for path in found)
        raise IntegrityError(
            f"--job-dir {folder}: holds {len(found)} jobs' server folders, not one:\n{listed}\ngive the folder of "
            "the one job to release (its server run folder, or what nvflare job download fetched)"
        )
    return found[0] if found else None


def check_job_id(job_id: str, *, run: Path, root: Path) -> None:
    """``--job`` must be the job the folder holds, as its ``meta.json`` names it (the simulator's, which has
    no job id, by its name), from the run folder up to ``root``."""
    named = _named_jobs(run, root)
    if not named:
        raise IntegrityError(
            f"--job {job_id}: {run} holds no {JOB_META_FILE} naming its job, so it cannot be checked to be job "
            f"{job_id}; give the job's folder as the server (or nvflare job download) left it"
        )
    ids = sorted(set(named.values()))
    if len(ids) > 1:
        listed = ", ".join(f"{path} names {ident}" for path, ident in named.items())
        raise IntegrityError(
            f"--job-dir {root}: its {JOB_META_FILE} files name different jobs ({listed}); give one job"
        )
    if ids[0] != job_id:
        raise IntegrityError(
            f"--job {job_id}: {root} holds job {ids[0]} (its {next(iter(named))}); give --job {ids[0]} to release "
            f"it, or the folder of job {job_id}"
        )


def _named_jobs(run: Path, root: Path) -> dict[Path, str]:
    """The job each ``meta.json`` from ``run`` up to ``root`` names."""
    named = {}
    for folder in (run, *run.parents):
        path = folder / JOB_META_FILE
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except ValueError:
                raise IntegrityError(f"{path}: not a job's meta.json (no JSON); download the job again") from None
            ident = meta.get("job_id") or meta.get("name")
            if ident:
                named[path] = str(ident)
        if folder == root:
            break
    return named


def _audit_job(
    audit: AuditLog,
    config: ConsortiumConfig,
    *,
    job_id: str,
    folder: Path,
    run: Path,
    results: JobResults,
    opened: Released,
) -> None:
    """The job's submission and every round the server completed, with the digests it recorded."""
    meta = _job_meta(folder)
    audit.append(
        EVENT_JOB_SUBMITTED,
        job_id=job_id,
        consortium=config.name,
        env="kits",
        submitter=meta.get("submitter_name"),
        submitter_org=meta.get("submitter_org"),
        submitted=meta.get("submit_time_iso"),
        status=meta.get("status"),
        members=[m.name for m in config.members],
        he_fingerprint=opened.he_fingerprint,
        server_audit_sha256=_server_audit_digest(folder),
    )
    digests = round_digests(run)
    for round_ in sorted({int(r.get("round") or 0) for records in results.records.values() for r in records}):
        sites = sorted(s for s, records in results.records.items() if any(r.get("round") == round_ for r in records))
        audit.append(EVENT_ROUND_COMPLETED, job_id=job_id, round=round_, sites=sites, **digests.get(round_, {}))


def _job_meta(folder: Path) -> dict:
    """The job's ``meta.json`` as the server keeps it (submitter, times, status); {} when absent."""
    for path in sorted(Path(folder).rglob(JOB_META_FILE), key=lambda p: len(p.parts)):
        meta = json.loads(path.read_text())
        if "submitter_name" in meta:
            return meta
    return {}


def _server_audit_digest(folder: Path) -> str | None:
    """sha256 of NVFlare's own audit log of the job at the server (chains it into ours), if downloaded."""
    paths = sorted(Path(folder).rglob(SERVER_AUDIT_FILE))
    return hashlib.sha256(paths[0].read_bytes()).hexdigest() if paths else None
