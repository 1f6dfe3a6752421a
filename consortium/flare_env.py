"""Run the consortium job for real on this machine: FLARE's simulator, or POC on loopback.

POC here is NVFlare's own ``nvflare poc`` tooling driven through its public command line, with the
project that :mod:`provisioning.project` builds for production and the site policies of
:mod:`provisioning.policies`; under HE the member key custodian's contexts (never NVFlare's HEBuilder)
are installed into the kits with :func:`provisioning.he_keys.install_keys`. The job is submitted
by a member lead's admin kit through ``ProdEnv``, exactly as on provisioned kits.

Everything lies under the ``workspace`` folder given: the simulator's workspace, or ``project.yml`` and
the POC workspace (kits, logs, job results).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from consortium.poc_rejoin import RejoinWatch, snapshot_job
from consortium.processes import processes_naming, stop_processes_under
from consortium.results import JobResults, read_records
from consortium.run_state import stored_round
from provisioning.he_keys import install_keys
from provisioning.policies import write_site_policies
from provisioning.project import build_project, member_lead
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

POC_WORKSPACE_ENV = "NVFLARE_POC_WORKSPACE"
INTERRUPTED = threading.Event()
"""Set by the CLI's SIGINT/SIGTERM handler: a failure that follows is the interrupt, not the job."""
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded|Leak)\w*: ")


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
    whose records and aggregate are copied in ``job_folder``, to be continued with every member."""

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


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Read by torch, OpenBLAS and MKL when a process loads them: how many threads their kernels use."""


def threads_each(processes: int) -> int:
    """Threads for each of ``processes`` busy processes on this machine: the user's ``OMP_NUM_THREADS``,
    else an equal share of the cores this process may use (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def shared_threads(members: int) -> dict[str, str]:
    """The thread variables for FLARE processes that all run on this machine: each member gets its share
    of the cores (:func:`threads_each`; torch and BLAS otherwise start a thread per core in every member,
    and members training at once on fewer cores wait on each other's threads). A variable already set
    in the environment is left as it is; provisioned kits, one machine per member, get none of this."""
    threads = str(threads_each(members))
    return {name: threads for name in THREAD_VARIABLES if not os.environ.get(name)}


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment (inherited by the processes it starts), then removed."""
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in variables:
            os.environ.pop(name, None)


@contextlib.contextmanager
def poc_system(
    config: ConsortiumConfig, workspace: Path, *, keys: Path | None, start_timeout: float = 180.0
) -> Iterator[Path]:
    """A running POC system for ``config`` (server and one client per member); yields its prod folder.

    ``keys``: the custodian's key folder (``consortium keys create``); with it, the HE contexts are
    installed and the members' privacy scope is written, as on provisioned kits. Every process is
    stopped on the way out, whatever happened.
    """
    check_ports_free(config)
    workspace.mkdir(parents=True, exist_ok=True)
    project_file = workspace / "project.yml"
    project_file.write_text(yaml.safe_dump(build_project(config), sort_keys=False))
    poc_workspace = workspace / "poc"
    env = {
        **os.environ,
        **shared_threads(len(config.members)),
        POC_WORKSPACE_ENV: str(poc_workspace),
        "PATH": _path_with_python(),
    }
    _nvflare(["poc", "prepare", "-i", str(project_file), "--force"], env=env, what="POC prepare")
    prod = _prod_dir(poc_workspace, config)
    # POC runs the recipe in place, with its code (byoc); kits get the exported job, which ships none
    write_site_policies(prod / config.operator.host, config=config, member_site=False, lead_byoc=True)
    for member in config.members:
        # a member's privacy scope only admits the HE job: a plaintext POC run gets the authorization alone
        write_site_policies(prod / member.name, config=config, member_site=keys is not None, lead_byoc=True)
    if keys is not None:
        install_keys(prod, keys, config=config)
    try:
        try:
            _nvflare(
                ["poc", "start", "--timeout", str(int(start_timeout)), *_exclude_admins(config)],
                env=env,
                what="POC start",
                timeout=start_timeout + 30,
            )
        except FederatedRunError as exc:
            raise FederatedRunError(f"{exc}\n{sites_not_up(config, prod)}") from None
        yield prod
    finally:
        if server_down(config) is None:  # a dead server cannot be asked to stop; its clients are ended below
            with contextlib.suppress(Exception):
                _nvflare(["poc", "stop"], env=env, what="POC stop", timeout=60)
        stop_processes_under(poc_workspace)


def sites_not_up(config: ConsortiumConfig, prod: Path) -> str:
    """Which POC process did not come up, and the log that says why (after a failed start)."""
    lines = []
    if (reason := server_down(config)) is not None:
        lines.append(
            f"server '{config.operator.host}' is not up ({reason}); its log: {_site_log(prod, config.operator.host)}"
        )
    for member in config.members:
        site_log = prod / member.name / "log.txt"
        registered = site_log.exists() and "Successfully registered client" in site_log.read_text(errors="replace")
        if not registered:
            lines.append(
                f"member '{member.name}' did not register with the server; its log: {_site_log(prod, member.name)}"
            )
    return "\n".join(lines) or f"every process came up late; the logs are under {prod}"


def _site_log(prod: Path, site: str) -> Path:
    """The site's FLARE log, or its console output when FLARE died before it could log."""
    site_log = prod / site / "log.txt"
    return site_log if site_log.exists() and site_log.stat().st_size else prod / site / "poc_console.log"


def run_poc(
    recipe,
    config: ConsortiumConfig,
    prod: Path,
    *,
    timeout: float,
    rounds: int,
    submitted: Callable[[str], None] | None = None,
) -> JobOutcome:
    """Submit ``recipe`` with the first member lead's admin kit and wait for it to finish; ``submitted`` is
    called with the job id as soon as FLARE returns it (the audit's ``job_submitted``).

    With members that dropped out, FLARE keeps the job RUNNING until its heartbeat gives up on them
    (10 minutes); once the server has aggregated every round from ``training.min_members`` and stored
    the last aggregate, the job's work is done: it is ended and read from the (local) server workspace.
    """
    from nvflare.recipe import ProdEnv

    lead = member_lead(config.members[0])
    env = ProdEnv(startup_kit_location=str(prod / lead), username=lead, login_timeout=30)
    job_id = None
    try:
        run = recipe.run(env)
        job_id = run.get_job_id()
        if submitted is not None:
            submitted(job_id)
        server_run = prod / config.operator.host / job_id
        rejoined = RejoinWatch(config, prod, job_id=job_id, rounds=rounds)
        status = _wait_until_finished(
            run,
            timeout=timeout,
            stopped=lambda: _server_stopped(config),
            done=lambda: _ended_locally(config, server_run, rounds) or (_MEMBER_BACK if rejoined() else None),
        )
        if status == _SERVER_STOPPED:
            raise FederatedRunError(server_stopped_message(config, prod, job_id), job_id=job_id, job_folder=server_run)
        if status == _MEMBER_BACK:
            raise _end_for_rejoin(run, rejoined, prod=prod)
        if status in (_DONE_WITHOUT_SILENT, _ENDED_INCOMPLETE):
            with contextlib.suppress(Exception):
                run.abort()  # the job's processes are gone; stop FLARE waiting for the silent members' heartbeat
            result = server_run
            status = "FINISHED:COMPLETED" if status == _DONE_WITHOUT_SILENT else "FINISHED:EXECUTION_EXCEPTION"
        else:
            result = run.get_result(timeout=120) if status else None
            status = run.get_status() or status
    except JobInterrupted:
        raise
    except KeyboardInterrupt as exc:  # what the server stored so far can be kept (--resume)
        raise JobInterrupted(
            job_id=job_id, job_folder=prod / config.operator.host / job_id if job_id else None
        ) from exc
    except FederatedRunError:
        raise
    except Exception as exc:
        where = {"job_id": job_id, "job_folder": prod / config.operator.host / job_id} if job_id else {}
        if server_down(config):  # FLARE's admin API fails in its own words when the server dies mid-call
            raise FederatedRunError(server_stopped_message(config, prod, job_id), **where) from exc
        raise FederatedRunError(
            f"POC job {job_id or '(not submitted)'} failed: {exc}; logs under {prod}{first_errors(prod, job_id)}",
            **where,
        ) from exc
    if result is None:
        with contextlib.suppress(Exception):
            run.abort()
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


def silent_members(config: ConsortiumConfig, folder: Path) -> str:
    """Who stopped answering, from what the server recorded: the usual cause of a failed round."""
    results = JobResults(folder=folder, records=read_records(folder), global_model=None)
    last = max((int(r[-1].get("round") or 0) + 1 for r in results.records.values() if r), default=1)
    dropped = results.dropped([m.name for m in config.members], last)
    silent = [f"{m} (no update from round {n})" for m, n in dropped.items()]
    if not silent:
        return ""
    return (
        f"; members silent: {', '.join(silent)}, while training.min_members = {config.min_members()} "
        f"had to answer within training.round_deadline = {config.training.round_deadline:g} s"
    )


def server_down(config: ConsortiumConfig) -> str | None:
    """POC only (the server is on this machine): why the operator's server is not there, or ``None``.

    Both of its ports refusing connections means its process is gone (a busy server still accepts)."""
    refused = []
    for field_name in ("fl_port", "admin_port"):
        port = getattr(config.operator, field_name)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return None
        except ConnectionRefusedError:
            refused.append(f"operator.{field_name} = {port}")
        except OSError:
            return None  # slow or unreachable is not proof of death; the job's own deadlines cover it
    return f"nothing listens on {' or '.join(refused)} any more"


def server_stopped_message(config: ConsortiumConfig, prod: Path, job_id: str | None) -> str:
    server_log = prod / config.operator.host / "log.txt"
    return (
        f"the FLARE server '{config.operator.host}' stopped while job {job_id} was running "
        f"({server_down(config) or 'it stopped answering'}); the job cannot finish without it. "
        f"The server's log: {server_log}{first_errors(prod, job_id)}\n"
        "Every FLARE process this run started has been stopped"
    )


def _server_stopped(config: ConsortiumConfig) -> str | None:
    """Two looks a poll apart, so a server restarting its listener is not taken for a dead one."""
    if server_down(config) is None:
        return None
    time.sleep(1.0)
    return server_down(config)


_SERVER_STOPPED = "SERVER_STOPPED"
_DONE_WITHOUT_SILENT = "DONE_WITHOUT_SILENT_MEMBERS"
_ENDED_INCOMPLETE = "ENDED_INCOMPLETE"
_MEMBER_BACK = "MEMBER_BACK"


def _end_for_rejoin(run, rejoined: RejoinWatch, *, prod: Path, wait: float = 60.0) -> MemberRejoined:
    """Keep what the job's server stored, end the job and wait for its processes to go: the continuing
    job (every member, from the next round) starts on free clients."""
    job_id, member = rejoined.job_id, rejoined.member
    kept = snapshot_job(rejoined.server_run, prod.parent / "rejoined" / job_id)
    round_ = stored_round(kept)
    with contextlib.suppress(Exception):
        run.abort()
    deadline = time.monotonic() + wait
    while processes_naming(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    return MemberRejoined(
        f"member {member} logged in again while job {job_id} ran; the job was ended after round {round_}",
        member=member,
        job_id=job_id,
        job_folder=kept,
    )


def _wait_until_finished(run, *, timeout: float, done=None, stopped=None, poll: float = 2.0) -> str | None:
    """Poll the job's status (our own loop, so an interrupt ends it at once); ``None`` on timeout.

    ``stopped`` is asked first and while FLARE's admin API waits on a server (its login times out after
    30 s, then it retries): a dead server ends the wait within seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped is not None and stopped():
            return _SERVER_STOPPED
        status = _status_unless_stopped(run, stopped)
        if status == _SERVER_STOPPED:
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
            return _SERVER_STOPPED
        asker.join(look_every)
    if "error" in answer:
        raise answer["error"]
    return answer.get("status")


def _ended_locally(config: ConsortiumConfig, server_run: Path, rounds: int) -> str | None:
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
        return _DONE_WITHOUT_SILENT
    if not processes_naming(server_run.name):
        # a job that ended normally has its folder archived into job storage and removed, maybe while it
        # was read above: only a folder still there, read again, tells an incomplete end
        if not server_run.exists():
            return None
        records = read_records(server_run)
        full = sum(len(records.get(m.name, [])) >= rounds for m in config.members)
        return _ENDED_INCOMPLETE if full < len(config.members) and server_run.exists() else None
    return None


def check_ports_free(config: ConsortiumConfig) -> None:
    """A clear error when the operator's ports are taken (another FLARE server?), before anything starts."""
    for field_name in ("fl_port", "admin_port"):
        port = getattr(config.operator, field_name)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise FederatedRunError(
                    f"{config.source}: operator.{field_name} = {port} is already in use on this machine "
                    "(another FLARE server?); stop it or pick free ports in consortium.yaml"
                ) from None


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
            if _EXCEPTION_LINE.match(line):
                found.setdefault(f"  {site}: {line.strip()[:300]}", None)
    ranked = sorted(found, key=lambda shown: "abort" in shown)
    return "\nerrors in the logs:\n" + "\n".join(ranked[:limit]) if ranked else ""


def _exclude_admins(config: ConsortiumConfig) -> list[str]:
    admins = [config.operator.admin, *(member_lead(m) for m in config.members)]
    return [arg for admin in admins for arg in ("-ex", admin)]


def _prod_dir(poc_workspace: Path, config: ConsortiumConfig) -> Path:
    prods = sorted((poc_workspace / config.name).glob("prod_*"))
    if not prods:
        raise FederatedRunError(f"{poc_workspace}: POC prepare made no prod_* folder; see its output above")
    return prods[-1]


def _path_with_python() -> str:
    """PATH with this interpreter's folder first: FLARE's processes start ``python3`` from PATH."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _nvflare(args: list[str], *, env: dict[str, str], what: str, timeout: float = 120.0) -> None:
    executable = shutil.which("nvflare", path=env["PATH"]) or "nvflare"
    try:
        done = subprocess.run(
            [executable, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise FederatedRunError(f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
        raise FederatedRunError(f"{what} failed (exit {done.returncode}):\n  " + "\n  ".join(tail))
    log.info("%s: %s", what, (done.stdout.strip().splitlines() or [""])[-1])
