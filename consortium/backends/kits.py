"""The provisioned-kits backend: a job submitted to a consortium already running from its startup kits,
through the admin startup kit of a member's lead (``consortium run --env kits --startup-kit KITS/<lead>``).

Nothing is started or stopped here: the operator runs the server and each member its site. The job is
exported as a lead may submit it on such kits (:func:`kits_job`: no code shipped, since leads have no
``byoc`` right, and no path of this machine named: each site reads its own ``CONSORTIUM_CONFIG`` and
keeps its outputs in its own workspace; the server's MLflow receiver writes to ``tracking.uri``, else to
the job's own result folder), submitted with NVFlare's admin API, then followed with the recipe API's
:class:`nvflare.recipe.Run` (``get_status``, ``get_result``, ``abort``) until it finishes, within the
run's timeout and ``training.round_deadline`` a round. The outcome is what FLARE hands the admin: the
job's result download (the server's run folder, with ``published.jsonl`` and the aggregate).

HE: the admin's kit holds no secret context. The aggregate is opened on this machine only where it also
holds the lead's member kit, beside the admin kit as ``consortium provision`` writes them
(``KITS/<member>/startup/client_context.tenseal``), as ``consortium release --keys <member kit>`` reads it;
:func:`~consortium.backends.admin_kit.member_context` finds it and
:func:`~consortium.backends.admin_kit.install_member_keys` puts the key pair in the run's key folder.
Elsewhere the run plan refuses the run and says to release the job at a member with ``consortium release``.

Secure aggregation: each member site masks with the key in its own kit (``consortium keys masks``). The run
plan refuses a run whose member kits on this machine (beside the admin kit) lack their mask keys or the
members' list (:func:`~consortium.backends.admin_kit.mask_key_problems`), before anything is submitted; the
job's audit entry records the fingerprints of the lead's member kit's list. Kits elsewhere are their
members' to check (``consortium keys verify``); a site without its keys fails its first round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from consortium.backends.admin_kit import LOGIN_TIMEOUT, AdminKit, lead_member_startup
from consortium.backends.base import Submitted
from consortium.backends.poc import SERVER_STOPPED, wait_until_finished
from consortium.flare_env import FederatedRunError, JobInterrupted, JobOutcome
from jobs.recipe import run_installed_code
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import PUBLISHED_FILE

log = logging.getLogger(__name__)

JOB_START_SECONDS = 300.0
"""Beyond its rounds, what a job may take to be scheduled, deployed at every site and ended."""
DOWNLOAD_SECONDS = 300.0
POLL_SECONDS = 5.0
"""Between status requests; each one logs in to the server anew (``nvflare.recipe.Run``)."""
UNREACHABLE_SECONDS = 180.0
"""A server that answers no status request for this long is taken to be down."""
MACHINE_PATH_FLAGS = ("--config", "--outputs")


class KitsBackend:
    """Jobs on a running provisioned consortium, submitted with ``kit``; exported jobs go under ``workspace``."""

    name = "kits"

    def __init__(self, config: ConsortiumConfig, workspace: Path, *, kit: AdminKit) -> None:
        self.config, self.workspace, self.kit = config, workspace, kit
        self.mask_keys = lead_member_startup(kit, config) if config.secure_aggregation() else None
        self._run = None  # nvflare.recipe.Run of the submitted job
        self._job_id: str | None = None
        self._rounds = 0
        self._finished = False

    def submit(self, recipe, *, rounds: int, submitted: Submitted | None = None) -> str:
        from nvflare.fuel.flare_api.flare_api import new_secure_session
        from nvflare.recipe import ProdEnv, Run

        self._run, self._job_id, self._rounds, self._finished = None, None, rounds, False
        folder = kits_job(recipe, self.workspace / "jobs", config=self.config)
        with self._failures():
            session = new_secure_session(self.kit.username, str(self.kit.folder), timeout=LOGIN_TIMEOUT)
            try:
                self._job_id = session.submit_job(str(folder))
            finally:
                session.close()
            env = ProdEnv(
                startup_kit_location=str(self.kit.folder), username=self.kit.username, login_timeout=LOGIN_TIMEOUT
            )
            self._run = Run(env, self._job_id)
            log.info("job %s submitted with %s as %s", self._job_id, self.kit.folder, self.kit.username)
            if submitted is not None:
                submitted(self._job_id)
        return self._job_id

    def deadline(self, timeout: float) -> float:
        """Seconds the job may run: the run's ``timeout``, at most the job's start and end plus
        ``training.round_deadline`` for each round (the server gives up on a round's task after it)."""
        return min(timeout, JOB_START_SECONDS + self._rounds * self.config.training.round_deadline)

    def wait(self, *, timeout: float) -> JobOutcome:
        job_id, run, limit = self._job_id, self._run, self.deadline(timeout)
        with self._failures():
            answered = _Answered(run)
            status = wait_until_finished(answered, timeout=limit, stopped=answered.silent, poll=POLL_SECONDS)
            if status == SERVER_STOPPED:
                self.abort()
                raise FederatedRunError(
                    f"the server of {self.kit.folder} has not answered about job {job_id} for "
                    f"{UNREACHABLE_SECONDS:.0f} s; is it still up? {self._where_logs()}",
                    job_id=job_id,
                )
            if status is None:
                self.abort()
                raise FederatedRunError(
                    f"job {job_id} did not finish within {limit:.0f} s (the run's timeout, or "
                    f"training.round_deadline = {self.config.training.round_deadline:g} s a round); it was "
                    f"aborted. {self._where_logs()}",
                    job_id=job_id,
                )
            self._finished = True
            if "COMPLETED" not in status:
                raise FederatedRunError(f"job {job_id} ended with status {status}. {self._where_logs()}", job_id=job_id)
            result = run.get_result(timeout=DOWNLOAD_SECONDS)
        if not result or not Path(result).is_dir():
            raise FederatedRunError(
                f"job {job_id} finished but its result could not be downloaded with {self.kit.folder}; "
                f"download it with 'nvflare job download' or 'consortium release --job {job_id} --kit "
                f"{self.kit.folder}'",
                job_id=job_id,
            )
        download = Path(result).resolve()
        runs = sorted({path.parent for path in download.rglob(PUBLISHED_FILE)})
        server_run = runs[0] if len(runs) == 1 else download  # the server's run folder, with its records
        return JobOutcome(
            job_id=job_id, result_dir=server_run, logs=download, kits={self.kit.username: self.kit.folder}
        )

    def abort(self) -> None:
        if self._run is not None and not self._finished:
            with contextlib.suppress(Exception):
                self._run.abort()

    def settle(self) -> None:
        """The server's MLflow receiver ended with the job, which FLARE reported finished."""

    def close(self, *, failed: bool) -> None:
        """Nothing of the consortium is this backend's to stop; a job still running after a failure is aborted."""
        if failed:
            self.abort()
        self._run = None

    def _where_logs(self) -> str:
        return (
            f"The job's logs are at the server and the member sites; its org's lead reads them with "
            f"'nvflare job logs {self._job_id}' (admin kit {self.kit.folder})"
        )

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """FLARE's exceptions, and an interrupt, as the run's errors naming the job. An interrupted job is
        aborted: its stored rounds stay in the server's job store (this machine holds none to continue from)."""
        try:
            yield
        except (JobInterrupted, FederatedRunError):
            raise
        except KeyboardInterrupt as exc:
            self.abort()
            raise JobInterrupted(job_id=self._job_id, job_folder=None) from exc
        except Exception as exc:
            job = f"job {self._job_id}" if self._job_id else "the job (not submitted)"
            raise FederatedRunError(
                f"{job} on the consortium of {self.kit.folder} failed: {exc}; check that the server is up and "
                f"that '{self.kit.username}' may submit jobs (a member's lead)",
                job_id=self._job_id,
            ) from exc


class _Answered:
    """A job's ``Run`` whose status requests are timed: :meth:`silent` once none has been answered for
    :data:`UNREACHABLE_SECONDS` (``Run.get_status`` answers ``None`` when the server cannot be reached)."""

    def __init__(self, run) -> None:
        self.run, self.last = run, time.monotonic()

    def get_status(self) -> str | None:
        status = self.run.get_status()
        if status is not None:
            self.last = time.monotonic()
        return status

    def silent(self) -> bool:
        return time.monotonic() - self.last > UNREACHABLE_SECONDS


def kits_job(recipe, folder: Path, *, config: ConsortiumConfig) -> Path:
    """``recipe`` exported under ``folder`` as a lead submits it to provisioned kits: the sites run their
    installed client script (no ``custom/`` code), read their own ``consortium.yaml`` and keep their own
    outputs (no path of this machine in the job), and the server's receiver writes to ``tracking.uri``
    (else to the job's result folder on the server). Returns the job's folder."""
    shutil.rmtree(folder, ignore_errors=True)
    recipe.export(str(folder))
    job = folder / recipe.name
    run_installed_code(job)
    for path in job.glob("*/config/config_fed_client.json"):
        client = json.loads(path.read_text())
        for executor in client.get("executors", []):
            args = executor.get("executor", {}).get("args", {})
            if "task_script_args" in args:
                args["task_script_args"] = without_machine_paths(args["task_script_args"])
        path.write_text(json.dumps(client, indent=2))
    for path in job.glob("*/config/config_fed_server.json"):
        server = json.loads(path.read_text())
        for component in server.get("components", []):
            args = component.get("args", {})
            if "tracking_uri" in args:
                args["tracking_uri"] = config.tracking.uri
            if args.get("resume_from"):
                raise UserError("a job on provisioned kits cannot continue from a folder of this machine")
        path.write_text(json.dumps(server, indent=2))
    return job


def without_machine_paths(arguments: str) -> str:
    """The client script's arguments without ``--config PATH`` and ``--outputs PATH``.

    >>> without_machine_paths("--fold 1 --config /a/consortium.yaml --outputs /a/sites")
    '--fold 1'
    """
    words, kept = shlex.split(arguments), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in MACHINE_PATH_FLAGS:
            skip = True
        else:
            kept.append(word)
    return " ".join(kept)
