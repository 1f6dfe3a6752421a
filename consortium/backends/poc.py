"""The POC backend: a job submitted to a POC system on this machine, by a member lead's admin kit
through ``ProdEnv``, exactly as on provisioned kits; the system (:mod:`consortium.backends.poc_system`)
starts with the first job and stops when the backend closes.

With members that dropped out, FLARE keeps a job RUNNING until its heartbeat gives up on them
(10 minutes); once the server has aggregated every round from ``training.min_members`` and stored the
last aggregate, the job's work is done: it is ended and read from the (local) server workspace. A member
that comes back while a job runs (:mod:`consortium.backends.rejoin`) ends the job after its stored round,
reported as :class:`~consortium.flare_env.MemberRejoined` with a copy of what the server stored; the
backend removes that copy when it submits the next job or closes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from consortium.backends.base import Submitted
from consortium.backends.logs import first_errors
from consortium.backends.poc_system import (
    poc_system,
    server_down,
    server_stopped,
    server_stopped_message,
    silent_members,
)
from consortium.backends.rejoin import RejoinWatch, snapshot_job
from consortium.flare_env import FederatedRunError, JobInterrupted, JobOutcome, MemberRejoined
from consortium.processes import processes_naming
from consortium.results import read_records
from consortium.run_state import stored_round
from provisioning.project import member_lead
from schema.config import ConsortiumConfig
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

SERVER_STOPPED = "SERVER_STOPPED"
DONE_WITHOUT_SILENT = "DONE_WITHOUT_SILENT_MEMBERS"
ENDED_INCOMPLETE = "ENDED_INCOMPLETE"
MEMBER_BACK = "MEMBER_BACK"


class PocBackend:
    """Jobs on a POC system under ``workspace``; ``keys``: the custodian's HE key folder, or ``None``."""

    name = "poc"

    def __init__(self, config: ConsortiumConfig, workspace: Path, *, keys: Path | None) -> None:
        self.config, self.workspace, self.keys = config, workspace, keys
        self._system = contextlib.ExitStack()
        self._prod: Path | None = None
        self._run = None  # FLARE's handle of the submitted job
        self._job_id: str | None = None
        self._rounds = 0
        self._handed_over: list[Path] = []  # copies of rejoined jobs' stored rounds, made here
        self.mask_keys: Path | None = None  # a member kit's startup/ once the system is up (secure aggregation)

    def submit(self, recipe, *, rounds: int, submitted: Submitted | None = None) -> str:
        from nvflare.recipe import ProdEnv

        self._remove_handed_over()
        if self._prod is None:
            self._prod = self._system.enter_context(poc_system(self.config, self.workspace, keys=self.keys))
            if self.config.secure_aggregation():
                self.mask_keys = self._prod / self.config.members[0].name / "startup"
        lead = member_lead(self.config.members[0])
        env = ProdEnv(startup_kit_location=str(self._prod / lead), username=lead, login_timeout=30)
        self._run, self._job_id, self._rounds = None, None, rounds
        with self._failures():
            self._run = recipe.run(env)
            self._job_id = self._run.get_job_id()
            if submitted is not None:
                submitted(self._job_id)
        return self._job_id

    def wait(self, *, timeout: float) -> JobOutcome:
        config, prod, job_id, run = self.config, self._prod, self._job_id, self._run
        server_run = prod / config.operator.host / job_id
        with self._failures():
            rejoined = RejoinWatch(config, prod, job_id=job_id, rounds=self._rounds)
            status = wait_until_finished(
                run,
                timeout=timeout,
                stopped=lambda: server_stopped(config),
                done=lambda: ended_locally(config, server_run, self._rounds) or (MEMBER_BACK if rejoined() else None),
            )
            if status == SERVER_STOPPED:
                raise FederatedRunError(
                    server_stopped_message(config, prod, job_id), job_id=job_id, job_folder=server_run
                )
            if status == MEMBER_BACK:
                raise self._end_for_rejoin(rejoined)
            if status in (DONE_WITHOUT_SILENT, ENDED_INCOMPLETE):
                self.abort()  # the job's processes are gone; stop FLARE waiting for the silent members' heartbeat
                result = server_run
                status = "FINISHED:COMPLETED" if status == DONE_WITHOUT_SILENT else "FINISHED:EXECUTION_EXCEPTION"
            else:
                result = run.get_result(timeout=120) if status else None
                status = run.get_status() or status
        if result is None:
            self.abort()
            raise FederatedRunError(
                f"POC job {job_id} did not finish within {timeout:.0f} s (status {status}); "
                f"logs under {prod}{first_errors(prod, job_id)}",
                job_id=job_id,
                job_folder=server_run,
            )
        if status and "COMPLETED" not in status:
            raise FederatedRunError(
                f"POC job {job_id} ended with status {status}{silent_members(config, prod)}; logs under {prod}"
                f"{first_errors(prod, job_id)}",
                job_id=job_id,
                job_folder=server_run,
            )
        kits = {name: prod / name for name in [config.operator.host, *(m.name for m in config.members)]}
        return JobOutcome(job_id=job_id, result_dir=Path(result), logs=prod, kits=kits)

    def abort(self) -> None:
        if self._run is not None:
            with contextlib.suppress(Exception):
                self._run.abort()

    def settle(self) -> None:
        """A POC job's MLflow receiver has ended when FLARE reports the job finished."""

    def close(self, *, failed: bool) -> None:
        try:
            self._system.close()  # every process of the system is stopped, whatever happened
        finally:
            self._remove_handed_over()
            self._prod = self._run = None

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """FLARE's own exceptions, and an interrupt, as the run's errors naming the job and its folder."""
        try:
            yield
        except (JobInterrupted, FederatedRunError):
            raise
        except KeyboardInterrupt as exc:  # what the server stored so far can be kept (--resume)
            raise JobInterrupted(**self._where()) from exc
        except Exception as exc:
            job_id, prod = self._job_id, self._prod
            if server_down(self.config):  # FLARE's admin API fails in its own words when the server dies mid-call
                raise FederatedRunError(server_stopped_message(self.config, prod, job_id), **self._where()) from exc
            raise FederatedRunError(
                f"POC job {job_id or '(not submitted)'} failed: {exc}; logs under {prod}{first_errors(prod, job_id)}",
                **self._where(),
            ) from exc

    def _where(self) -> dict:
        if not self._job_id:
            return {"job_id": None, "job_folder": None}
        return {"job_id": self._job_id, "job_folder": self._prod / self.config.operator.host / self._job_id}

    def _end_for_rejoin(self, rejoined: RejoinWatch, *, wait: float = 60.0) -> MemberRejoined:
        """Keep what the job's server stored, end the job and wait for its processes to go: the continuing
        job (every member, from the next round) starts on free clients."""
        job_id, member = rejoined.job_id, rejoined.member
        kept = snapshot_job(rejoined.server_run, self._prod.parent / "rejoined" / job_id)
        self._handed_over.append(kept)
        round_ = stored_round(kept)
        self.abort()
        deadline = time.monotonic() + wait
        while processes_naming(job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        return MemberRejoined(
            f"member {member} logged in again while job {job_id} ran; the job was ended after round {round_}",
            member=member,
            job_id=job_id,
            job_folder=kept,
        )

    def _remove_handed_over(self) -> None:
        while self._handed_over:
            shutil.rmtree(self._handed_over.pop(), ignore_errors=True)


def wait_until_finished(run, *, timeout: float, done=None, stopped=None, poll: float = 2.0) -> str | None:
    """Poll the job's status (our own loop, so an interrupt ends it at once); ``None`` on timeout.

    ``stopped`` is asked first and while FLARE's admin API waits on a server (its login times out after
    30 s, then it retries): a dead server ends the wait within seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped is not None and stopped():
            return SERVER_STOPPED
        status = _status_unless_stopped(run, stopped)
        if status == SERVER_STOPPED:
            return status
        if status and status.startswith("FINISHED"):
            return status
        ended = done() if done is not None else None
        if ended:
            return ended
        time.sleep(poll)
    return None


def _status_unless_stopped(run, stopped, *, look_every: float = 1.0) -> str | None:
    """``run.get_status()`` from a thread, abandoned (the thread ends with FLARE's login timeout) once
    ``stopped`` says the server is gone."""
    if stopped is None:
        return run.get_status()
    answer: dict = {}

    def ask() -> None:
        try:
            answer["status"] = run.get_status()
        except Exception as exc:  # raised in the caller's thread below
            answer["error"] = exc

    asker = threading.Thread(target=ask, name="flare-job-status", daemon=True)
    asker.start()
    asker.join(look_every)
    while asker.is_alive():
        if stopped():
            return SERVER_STOPPED
        asker.join(look_every)
    if "error" in answer:
        raise answer["error"]
    return answer.get("status")


def ended_locally(config: ConsortiumConfig, server_run: Path, rounds: int) -> str | None:
    """POC only (the server is on this machine). With members that dropped out, FLARE keeps the job
    RUNNING until its heartbeat gives up on them; decide from the server's own files and processes:
    every round aggregated from at least min_members and the last aggregate stored after it -> done;
    no process of the job left -> ended incomplete."""
    if not server_run.exists():
        return None
    published, models = list(server_run.rglob(PUBLISHED_FILE)), list(server_run.rglob(GLOBAL_MODEL_FILE))
    records = read_records(server_run)
    full = sum(len(records.get(m.name, [])) >= rounds for m in config.members)
    enough = published and models and config.min_members() <= full < len(config.members)
    if enough and max(m.stat().st_mtime for m in models) >= max(p.stat().st_mtime for p in published):
        return DONE_WITHOUT_SILENT
    if not processes_naming(server_run.name):
        # a job that ended normally has its folder archived into job storage and removed, maybe while it
        # was read above: only a folder still there, read again, tells an incomplete end
        if not server_run.exists():
            return None
        records = read_records(server_run)
        full = sum(len(records.get(m.name, [])) >= rounds for m in config.members)
        return ENDED_INCOMPLETE if full < len(config.members) and server_run.exists() else None
    return None
