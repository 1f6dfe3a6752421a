"""Run a job in FLARE's simulator; go on as soon as its results are complete.

NVFlare 2.9's simulator outlives its job by ~6 s: after the last round it waits ~2 s for late metric
events (``END_RUN`` readiness), then its server app stops (~1.5 s), then its process manager sleeps a
fixed 3 s "to let pending activities finish" (``mpm.run(shutdown_grace_time=3)``, not configurable)
before the process exits. The job marks its run folder when the workflow is over and again at
``END_RUN`` (:class:`jobs.job_end.MarkJobEnded`). :func:`run_sim` returns at the first mark, with the
simulator's :class:`Ending`: the caller reads the results and writes its report meanwhile, waits for the
second mark before it writes to the MLflow store the simulator's receiver also writes to
(:meth:`Ending.wait_ended`), and then ends what is left of the simulator, which is only sleeping by then
(:meth:`Ending.finish`). On an error or an interrupt :meth:`Ending.stop` ends it at once: no FLARE
process outlives the command.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from consortium.flare_env import (
    INTERRUPTED,
    FederatedRunError,
    JobInterrupted,
    JobOutcome,
    environment,
    first_errors,
    shared_threads,
)
from consortium.processes import signal_processes_under, stop_processes_under
from schema.config import ConsortiumConfig
from schema.names import JOB_ENDED_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

LOOK_EVERY = 0.1
"""Seconds between two looks for the job's end mark (a stat call)."""
START_ALLOWANCE = 120.0
"""Seconds the simulator may take, beyond a round's deadline, to start its sites and answer round 0."""


class Ending:
    """The simulator of a job whose results are complete, still running in a thread of this process."""

    def __init__(
        self, thread: threading.Thread, failure: list[BaseException], *, workspace: Path, logs: Path, since: float
    ) -> None:
        self._thread, self._failure, self._workspace, self.logs = thread, failure, workspace, logs
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
        if self._failure and not self._stopped:
            log.warning(
                "FLARE's simulator failed after its job's results were complete: %s (logs in %s)",
                self._failure[0],
                self.logs,
            )

    def stop(self) -> None:
        """End the simulator's processes now and wait for its thread."""
        self._stopped = True
        stop_processes_under(self._workspace)
        self._thread.join(30.0)


def run_sim(
    recipe,
    config: ConsortiumConfig,
    workspace: Path,
    *,
    started: Callable[[], None] | None = None,
    submitted: Callable[[str], None] | None = None,
) -> tuple[JobOutcome, Ending]:
    """Run ``recipe`` in FLARE's simulator, one process per member; return once the job's results are
    complete, with the simulator's :class:`Ending`. ``submitted`` is called with the job id (the recipe's
    name) as the simulator starts; ``started`` once its server writes its log (from then on this process
    only waits)."""
    from nvflare.recipe import SimEnv

    sim = SimEnv(clients=[m.name for m in config.members], workspace_root=str(workspace))
    logs = workspace / recipe.name
    failure: list[BaseException] = []
    runs: list = []

    def simulate() -> None:
        try:
            runs.append(recipe.run(sim))
        except BaseException as exc:  # raised in the caller's thread (before the end mark) or logged (after)
            failure.append(exc)

    since = time.time()
    thread = threading.Thread(target=simulate, name="flare-simulator", daemon=True)
    ending = Ending(thread, failure, workspace=workspace, logs=logs, since=since)
    # a simulator whose server died waits for ever: no record for longer than a round may take ends it
    deadline = config.training.round_deadline
    progress = _Progress(logs, allowance=deadline + START_ALLOWANCE)
    try:
        with environment(shared_threads(len(config.members))):  # the simulator's member processes inherit it
            if submitted is not None:
                submitted(recipe.name)
            thread.start()
            while thread.is_alive() and not _results_complete(_mark(logs, since=since)):
                if started is not None and (logs / "server" / "log.txt").exists():
                    started, call = None, started
                    call()
                if progress.stalled(deadline):
                    raise FederatedRunError(
                        f"simulated job {recipe.name}: no site's result reached the server for "
                        f"{progress.silent():.0f} s (training.round_deadline = {deadline:g} s): the simulator's "
                        f"server or its sites stopped; logs in {logs}/server/log.txt{first_errors(logs)}",
                        job_id=recipe.name,
                        job_folder=logs,
                    )
                thread.join(LOOK_EVERY)
    except KeyboardInterrupt as exc:
        ending.stop()  # interrupted: no simulator process outlives the command
        raise JobInterrupted(job_id=recipe.name, job_folder=logs) from exc  # its stored rounds can be kept
    except FederatedRunError:
        ending.stop()  # stalled: no simulator process outlives the command
        raise
    except BaseException:
        ending.stop()
        raise
    if not thread.is_alive() and (failure or not runs):
        ending.stop()
        exc = failure[0] if failure else RuntimeError("the simulator ended without a result")
        if INTERRUPTED.is_set():
            raise JobInterrupted(job_id=recipe.name, job_folder=logs) from exc
        if not isinstance(exc, RuntimeError):
            raise exc
        raise FederatedRunError(
            f"simulated job failed; logs in {logs}/server/log.txt and {logs}/<member>/log.txt{first_errors(logs)}",
            job_id=recipe.name,
            job_folder=logs,  # what the simulator's server stored before it failed is kept (--resume)
        ) from exc
    return JobOutcome(job_id=recipe.name, result_dir=logs, logs=logs, kits={}), ending


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
