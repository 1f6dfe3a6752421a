"""Release a job run on provisioned kits: download it with a lead's admin kit, open the aggregate with a
member's secret context, write the report, register the model, and record it all in the audit log.

``consortium release`` (and ``consortium report --job``, the same code path) call :func:`release_job`.
The audit log (``<out>/audit.jsonl``) gets the job's submission (who, when, from the job's own
``meta.json``, and the sha256 of the server's own ``audit.log`` of the job, so that NVFlare's record is
chained into ours), one entry per round the server completed, and the release.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from consortium.audit import EVENT_JOB_SUBMITTED, EVENT_ROUND_COMPLETED, AuditLog
from consortium.orchestration import RunResult, report_from_job
from consortium.results import ResultsError, read_job
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import CLIENT_CONTEXT_FILE

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
    """Download (``kit``) or read (``job_dir``) the job, release it into ``out``; see the module docstring."""
    if (kit is None) == (job_dir is None):
        raise UserError("give either --kit LEAD_KIT (download the job) or --job-dir FOLDER (already downloaded)")
    context = secret_context_file(keys) if keys is not None else None
    folder = Path(job_dir) if job_dir is not None else download_job(job_id, kit=kit)
    results = read_job(folder, config=config)  # before anything is written: a wrong job is refused here
    if results.global_model is None:
        raise ResultsError(f"{folder}: job {job_id} stored no aggregate; did it finish its last round?")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(out / AUDIT_FILE)
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
        server_audit_sha256=_server_audit_digest(folder),
    )
    for round_ in range(max((len(r) for r in results.records.values()), default=0)):
        sites = sorted(s for s, r in results.records.items() if len(r) > round_)
        audit.append(EVENT_ROUND_COMPLETED, job_id=job_id, round=round_, sites=sites)
    result = report_from_job(config, job_folder=folder, job_id=job_id, out=out, client_context=context, results=results)
    log.info("released job %s into %s", job_id, out)
    return result


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
