"""The simulator backend: a job in FLARE's simulator, waited for until its results are complete.

NVFlare 2.9's simulator outlives its job by ~6 s: after the last round it waits ~2 s for late metric
events (``END_RUN`` readiness), then its server app stops (~1.5 s), then its process manager sleeps a
fixed 3 s "to let pending activities finish" (``mpm.run(shutdown_grace_time=3)``, not configurable)
before the process exits. The job marks its run folder when the workflow is over and again at
``END_RUN`` (:class:`jobs.job_end.MarkJobEnded`). :meth:`SimBackend.wait` returns at the first mark and
keeps the simulator's :class:`Ending`: the caller reads the results and writes its report meanwhile,
calls :meth:`SimBackend.settle` (the second mark) before it writes to the MLflow store the simulator's
receiver also writes to, and :meth:`SimBackend.close` then ends what is left of the simulator, which is
only sleeping by then. After an error or an interrupt it is ended at once: no FLARE process outlives the
command.

Deadlines: a simulator that records no site's result for longer than ``training.round_deadline`` (its
server or sites stopped) is ended, and so is a job still running after the ``timeout`` of :meth:`wait`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from consortium.backends.base import Submitted
from consortium.backends.logs import first_errors
from consortium.backends.threads import environment, shared_threads
from consortium.flare_env import INTERRUPTED, FederatedRunError, JobInterrupted, JobOutcome
from consortium.processes import signal_processes_under, stop_processes_under
from jobs.he.mask_files import make_member_keys
from schema.config import ConsortiumConfig
from schema.names import JOB_ENDED_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

LOOK_EVERY = 0.1
"""Seconds between two looks for the job's end mark (a stat call)."""
START_ALLOWANCE = 120.0
"""Seconds the simulator may take, beyond a round's deadline, to start its sites and answer round 0."""


class Simulator:
    """FLARE's simulator running ``run()`` in a thread of this process; what it returned or raised."""

    def __init__(self, run: Callable[[], object]) -> None:
        self._run = run
        self.returned = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._simulate, name="flare-simulator", daemon=True)

    def _simulate(self) -> None:
        try:
            self._run()
            self.returned = True
        except BaseException as exc:  # raised in the caller's thread (before the end mark) or logged (after)
            self.failure = exc


class Ending:
    """The simulator of a job whose results are complete, still running in a thread of this process."""

    def __init__(self, simulator: Simulator, *, workspace: Path, logs: Path, since: float) -> None:
        self._simulator, self._thread = simulator, simulator.thread
        self._workspace, self.logs = workspace, logs
        self._since = since  # when the simulator was started: an older mark in its folder is not its own
        self._stopped = False

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_ended(self, *, timeout: float = 60.0) -> None:
        """Return once every server component has ended the job (its tracking receiver included), or the
        simulator has exited."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and not _mark(self.logs, since=self._since).get("ended_at"):
            if time.monotonic() > deadline:
                log.warning("FLARE's simulator did not end its job within %.0f s of its results", timeout)
                return
            self._thread.join(LOOK_EVERY)

    def finish(self) -> None:
        """After the job has ended: end the simulator's process, which by then only sleeps out its grace
        periods. A failure the simulator reported after its results were complete is logged."""
        self.wait_ended()
        if self._thread.is_alive():
            self._stopped = True
            signal_processes_under(self._workspace)  # SIGTERM
            self._thread.join(5.0)  # the simulator's main process has exited
            stop_processes_under(self._workspace)  # what SIGTERM did not end (at once when nothing is left)
            self._thread.join(30.0)
        if self._simulator.failure is not None and not self._stopped:
            log.warning(
                "FLARE's simulator failed after its job's results were complete: %s (logs in %s)",
                self._simulator.failure,
                self.logs,
            )

    def stop(self) -> None:
        """End the simulator's processes now and wait for its thread."""
        self._stopped = True
        stop_processes_under(self._workspace)
        if self._thread.ident is not None:  # started
            self._thread.join(30.0)


class SimBackend:
    """FLARE's simulator under ``workspace``, one process per member; ``started`` is called once a job's
    server writes its log (from then on this process only waits)."""

    name = "sim"
    mask_keys: Path | None = None

    def __init__(self, config: ConsortiumConfig, workspace: Path, *, started: Callable[[], None] | None = None):
        self.config, self.workspace, self._started = config, workspace, started
        self._job: _SimJob | None = None
        self._ending: Ending | None = None  # the last job's simulator, still ending

    def submit(self, recipe, *, rounds: int, submitted: Submitted | None = None) -> str:
        if self._ending is not None:  # one simulator at a time: the last one's teardown ends first
            self._ending.finish()
            self._ending = None
        self._job = _SimJob(recipe, self.config, self.workspace)
        if getattr(recipe, "secure_aggregation", False):  # the members' public mask keys, for the audit log
            self.mask_keys = self.workspace / "mask_keys" / self.config.members[0].name
        self._job.start(submitted)
        return recipe.name

    def wait(self, *, timeout: float) -> JobOutcome:
        job, self._job = self._job, None
        outcome = job.wait(timeout=timeout, started=self._started)
        self._started = None
        self._ending = job.ending
        return outcome

    def abort(self) -> None:
        for ending in (self._job.ending if self._job else None, self._ending):
            if ending is not None:
                ending.stop()

    def settle(self) -> None:
        if self._ending is not None:
            self._ending.wait_ended()

    def close(self, *, failed: bool) -> None:
        if failed:
            self.abort()
        elif self._ending is not None:
            self._ending.finish()
        self._job = self._ending = None


class _SimJob:
    """One simulated job, run by ``recipe.run`` in a thread of this process."""

    def __init__(self, recipe, config: ConsortiumConfig, workspace: Path) -> None:
        from nvflare.recipe import SimEnv

        self.recipe, self.config = recipe, config
        if getattr(recipe, "secure_aggregation", False):
            # simulated members on one machine: each one's mask key in its own folder of the workspace
            folder = workspace / "mask_keys"
            make_member_keys(folder, [m.name for m in config.members])
            recipe.use_key_folder(folder)
        self.sim = SimEnv(clients=[m.name for m in config.members], workspace_root=str(workspace))
        self.logs = workspace / recipe.name
        self.since = time.time()
        self.simulator = Simulator(lambda: recipe.run(self.sim))
        self.thread = self.simulator.thread
        self.ending = Ending(self.simulator, workspace=workspace, logs=self.logs, since=self.since)
        self.threads = contextlib.ExitStack()

    def start(self, submitted: Submitted | None) -> None:
        # the simulator's member processes inherit the thread variables: set until its results are complete
        self.threads.enter_context(environment(shared_threads(len(self.config.members))))
        try:
            if submitted is not None:
                submitted(self.recipe.name)
            self.thread.start()
        except BaseException:
            self.threads.close()
            raise

    def wait(self, *, timeout: float, started: Callable[[], None] | None) -> JobOutcome:
        name, logs = self.recipe.name, self.logs
        where = {"job_id": name, "job_folder": logs}  # what the simulator's server stored is kept (--resume)
        # a simulator whose server died waits for ever: no record for longer than a round may take ends it
        deadline = self.config.training.round_deadline
        progress = _Progress(logs, allowance=deadline + START_ALLOWANCE)
        give_up = time.monotonic() + timeout
        try:
            with self.threads:
                while self.thread.is_alive() and not _results_complete(_mark(logs, since=self.since)):
                    if started is not None and (logs / "server" / "log.txt").exists():
                        started, call = None, started
                        call()
                    if progress.stalled(deadline):
                        raise FederatedRunError(
                            f"simulated job {name}: no site's result reached the server for "
                            f"{progress.silent():.0f} s (training.round_deadline = {deadline:g} s): the simulator's "
                            f"server or its sites stopped; logs in {logs}/server/log.txt{first_errors(logs)}",
                            **where,
                        )
                    if time.monotonic() > give_up:
                        raise FederatedRunError(
                            f"simulated job {name} did not finish within {timeout:.0f} s; logs in {logs}", **where
                        )
                    self.thread.join(LOOK_EVERY)
        except KeyboardInterrupt as exc:
            self.ending.stop()  # interrupted: no simulator process outlives the command
            raise JobInterrupted(**where) from exc  # its stored rounds can be kept
        except BaseException:
            self.ending.stop()  # stalled, late or failed: no simulator process outlives the command
            raise
        failure = self.simulator.failure
        if not self.thread.is_alive() and (failure is not None or not self.simulator.returned):
            self.ending.stop()
            exc = failure if failure is not None else RuntimeError("the simulator ended without a result")
            if INTERRUPTED.is_set():
                raise JobInterrupted(**where) from exc
            if not isinstance(exc, RuntimeError):
                raise exc
            raise FederatedRunError(
                f"simulated job failed; logs in {logs}/server/log.txt and {logs}/<member>/log.txt{first_errors(logs)}",
                **where,
            ) from exc
        return JobOutcome(job_id=name, result_dir=logs, logs=logs, kits={})


class _Progress:
    """When the simulator's server last recorded a site's result (the size of its ``published.jsonl``)."""

    def __init__(self, logs: Path, *, allowance: float) -> None:
        self.logs, self.allowance = logs, allowance
        self.size, self.changed, self.seen = -1, time.monotonic(), False
        self.next_look = 0.0

    def stalled(self, deadline: float) -> bool:
        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + 1.0  # a glob a second, not ten
        try:
            size = sum(p.stat().st_size for p in self.logs.rglob(PUBLISHED_FILE)) if self.logs.exists() else 0
        except OSError:  # the simulator moves folders while this looks: look again in a second
            return False
        if size != self.size:
            self.seen = self.seen or size > 0
            self.size, self.changed = size, now
        # before the first record the sites still start (round 0 carries their start-up)
        return self.silent() > (deadline if self.seen else self.allowance)

    def silent(self) -> float:
        return time.monotonic() - self.changed


def _mark(logs: Path, *, since: float) -> dict:
    """The job-end mark of this run's server (not of an earlier run in the same workspace), or ``{}``."""
    for path in logs.glob(f"server/*/{JOB_ENDED_FILE}"):
        try:
            if path.stat().st_mtime >= since:
                return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue
    return {}


def _results_complete(mark: dict) -> bool:
    """The workflow is over and FLARE recorded no fatal error (after one, the simulator's own exit code
    decides, as it always did)."""
    return bool(mark.get("results_at")) and not mark.get("fatal")
