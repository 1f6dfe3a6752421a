"""What a run records in its audit log about a job: its submission, and each round its server completed.

(The entries' names and the log itself: :mod:`consortium.audit`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consortium.audit import EVENT_JOB_SUBMITTED, EVENT_KEYS_CREATED, EVENT_ROUND_COMPLETED, AuditLog
from consortium.backends.base import Backend
from consortium.results import JobResults
from provisioning.he_keys import create_keys, load_context, public_fingerprint
from provisioning.mask_keys import list_fingerprints
from schema.config import ConsortiumConfig
from schema.names import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE


@dataclass(frozen=True)
class Submission:
    """A job as its ``job_submitted`` entry describes it; ``continuation``: for a job that continues an
    interrupted one, the job it continues and its first round."""

    config: ConsortiumConfig
    env: str
    he: bool
    rounds: int
    fold: int | None
    keys: Path | None
    continuation: dict[str, Any] = field(default_factory=dict)

    def record(self, audit: AuditLog, job_id: str, *, backend: Backend | None = None) -> None:
        """The job's submission; under HE with the fingerprint of the public context its server was given;
        under secure aggregation with each member's mask key fingerprint, from the list of the member kit
        the ``backend`` holds on this machine (:attr:`~consortium.backends.base.Backend.mask_keys`)."""
        keys = self.keys
        fingerprint = public_fingerprint(load_context(keys / SERVER_CONTEXT_FILE)) if keys else None
        masks = {}
        if self.config.secure_aggregation():
            folder = backend.mask_keys if backend is not None else None
            masks = {"mask_fingerprints": list_fingerprints(folder) if folder is not None else None}
        audit.append(
            EVENT_JOB_SUBMITTED,
            job_id=job_id,
            consortium=self.config.name,
            env=self.env,
            rounds=self.rounds,
            he=self.he,
            he_fingerprint=fingerprint,
            dp=self.config.privacy.dp.enabled,
            fold=self.fold,
            members=[m.name for m in self.config.members],
            secure_aggregation=self.config.secure_aggregation(),
            **masks,
            **self.continuation,
        )


def audit_rounds(
    audit: AuditLog, job_id: str, results: JobResults, *, rounds: range, digests: dict[int, dict] | None = None
) -> None:
    """One entry per round, with what the server recorded as it completed (``digests``: see
    :func:`consortium.results.round_digests`)."""
    for round_ in rounds:
        sites = sorted(s for s, records in results.records.items() if any(r.get("round") == round_ for r in records))
        audit.append(EVENT_ROUND_COMPLETED, job_id=job_id, round=round_, sites=sites, **(digests or {}).get(round_, {}))


def custodian_keys(config: ConsortiumConfig, out: Path, audit: AuditLog) -> Path:
    """The key custodian's step, done here because one machine plays every role in a POC run."""
    folder = out / "he_keys"
    if (folder / CLIENT_CONTEXT_FILE).exists() and (folder / SERVER_CONTEXT_FILE).exists():
        audit.append("keys_reused", fingerprint=public_fingerprint(load_context(folder / SERVER_CONTEXT_FILE)))
    else:
        keyset = create_keys(config.privacy.he, out=folder)
        audit.append(EVENT_KEYS_CREATED, fingerprint=keyset.fingerprint, custodian="all roles on this machine (POC)")
    return folder
