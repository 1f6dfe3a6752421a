"""What every backend's job ends with: its outcome, or the errors a federated run fails or stops with.

Light on purpose (no NVFlare import): the CLI's signal handler sets :data:`INTERRUPTED` in this module
when a command that runs FLARE has loaded it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from schema.errors import UserError

INTERRUPTED = threading.Event()
"""Set by the CLI's SIGINT/SIGTERM handler: a failure that follows is the interrupt, not the job."""


class JobInterrupted(KeyboardInterrupt):
    """The command was interrupted (SIGINT, SIGTERM) while a job ran: what the job's server stored under
    ``job_folder`` can be kept and continued with ``--resume``; ``hint`` says so once it is kept."""

    def __init__(self, *, job_id: str | None, job_folder: Path | None) -> None:
        super().__init__("interrupted")
        self.job_id, self.job_folder, self.hint = job_id, job_folder, ""


class FederatedRunError(UserError):
    """A federated run failed or did not finish; the message points at the logs. ``job_id`` and
    ``job_folder`` (the server's run folder of the job, on this machine) are set when a job had started:
    what its server stored can then be kept and continued (``consortium run --resume``)."""

    exit_code = 1

    def __init__(self, message: str, *, job_id: str | None = None, job_folder: Path | None = None) -> None:
        super().__init__(message)
        self.job_id, self.job_folder = job_id, job_folder


class MemberRejoined(FederatedRunError):
    """POC: ``member`` came back while the job ran; the job was ended after the round its server stored,
    whose records and aggregate are copied in ``job_folder``, to be continued with every member. The
    backend that made the copy removes it when it submits the next job or closes."""

    def __init__(self, message: str, *, member: str, job_id: str, job_folder: Path) -> None:
        super().__init__(message, job_id=job_id, job_folder=job_folder)
        self.member = member


@dataclass(frozen=True)
class JobOutcome:
    """Where a finished job left what the server holds (``published.jsonl``, the global model)."""

    job_id: str
    result_dir: Path
    logs: Path
    kits: dict[str, Path]
