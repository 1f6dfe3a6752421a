"""Reading FLARE's logs: the exceptions a failed job's logs end their tracebacks with."""

from __future__ import annotations

import re
from pathlib import Path

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded|Leak)\w*: ")
_LOGGED_CAUSE = re.compile(r" - ((?:MaskRefused|SecureAggregationFailed): .*)$")
"""A cause a component logs without a traceback (secure aggregation's refusals: jobs.member_masks)."""


def first_errors(folder: Path | None, job_id: str | None = None, *, limit: int = 4) -> str:
    """The exceptions the job's FLARE logs end their tracebacks with, causes before the aborts they
    triggered; shown with a failure (the full logs stay on disk)."""
    if folder is None or not Path(folder).exists():
        return ""
    found: dict[str, None] = {}
    for log_file in sorted(Path(folder).rglob("log.txt")):
        if job_id and job_id not in log_file.parts and Path(folder).name != job_id:
            continue
        site = log_file.relative_to(folder).parts[0]
        for line in log_file.read_text(errors="replace").splitlines():
            logged = _LOGGED_CAUSE.search(line)
            if _EXCEPTION_LINE.match(line) or logged:
                shown = logged.group(1) if logged else line.strip()
                found.setdefault(f"  {site}: {shown[:300]}", None)
    ranked = sorted(found, key=lambda shown: "abort" in shown)
    return "\nerrors in the logs:\n" + "\n".join(ranked[:limit]) if ranked else ""


def site_log(prod: Path, site: str) -> Path:
    """The site's FLARE log, or its console output when FLARE died before it could log."""
    path = prod / site / "log.txt"
    return path if path.exists() and path.stat().st_size else prod / site / "poc_console.log"
