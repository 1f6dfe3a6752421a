"""The one interface a run speaks to whatever runs its jobs: FLARE's simulator, POC, or provisioned kits.

A backend submits a recipe (:meth:`Backend.submit`), waits for its job with a deadline
(:meth:`Backend.wait`: the :class:`~consortium.flare_env.JobOutcome`, or a
:class:`~consortium.flare_env.FederatedRunError` / :class:`~consortium.flare_env.JobInterrupted` carrying
the job folder whose stored rounds can be kept), and aborts it (:meth:`Backend.abort`). Whatever it
starts (processes, a POC system, a simulator still ending) it ends on :meth:`Backend.close`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from consortium.flare_env import JobOutcome

ENVIRONMENTS = {
    "sim": "FLARE simulator",
    "poc": "a real server and clients on this machine",
    "kits": "a running consortium of provisioned startup kits, with --startup-kit",
}
"""The environments a run's jobs can run in (:func:`consortium.backends.open.open_backend`)."""

ADMIN_CONFIG = "fed_admin.json"
"""What an admin startup kit holds under ``startup/`` (the server it logs in to, its certificates)."""

Submitted = Callable[[str], None]
"""Called with the job id as soon as FLARE returns it (the audit's ``job_submitted``)."""


class Backend(Protocol):
    """Runs one job at a time."""

    name: str
    mask_keys: Path | None
    """Where secure aggregation masks: a member's key folder on this machine holding the members' public
    mask keys (``mask_public_keys.json``), once the system is up; its fingerprints go into the job's audit
    entry. ``None`` where this machine holds none."""

    def submit(self, recipe, *, rounds: int, submitted: Submitted | None = None) -> str:
        """Start ``recipe``'s job of ``rounds`` rounds; its id."""
        ...

    def wait(self, *, timeout: float) -> JobOutcome:
        """The submitted job's outcome once its results are complete; a job past ``timeout`` seconds (or
        stalled) is ended and reported as a :class:`~consortium.flare_env.FederatedRunError`."""
        ...

    def abort(self) -> None:
        """End the submitted job now."""
        ...

    def settle(self) -> None:
        """Return once the last job's server components have ended (its MLflow receiver included)."""
        ...

    def close(self, *, failed: bool) -> None:
        """End everything this backend started: at once after a failure, else once its jobs have ended."""
        ...
