"""Run the biomarker job for real on this machine: FLARE's simulator or a POC deployment.

Everything a run writes lies under the ``out`` folder it is given::

    out/sites/<member>/   each site's metrics.jsonl, model.pt (private) and biomarkers_<task>.csv
    out/mlflow.db         MLflow tracking store (unless consortium.yaml names a tracking URI)
    out/flare/            FLARE's workspace: simulator workspace, or POC startup kits, logs and results
    out/flare/project.yml (POC) the generated project: the members as clients, the operator's ports
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import jobs
from consortium.config import ConsortiumConfig
from jobs.biomarker_mtl.job import build_recipe
from jobs.site_outputs import read_metrics, site_folder

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, Any]], None]
GLOBAL_MODEL_FILE = "FL_global_model.pt"
ENCRYPTED_MODEL_FILE = "FL_global_model.ckks"  # jobs.he.server: the HE job's aggregate, never decrypted there
POC_WORKSPACE_ENV = "NVFLARE_POC_WORKSPACE"
POC_ADMIN = "admin@nvidia.com"  # PocEnv's default admin user; only used on loopback
POLL_SECONDS = 1.0
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exceeded|Leak)\w*: ")


class FederatedRunError(RuntimeError):
    """A federated run failed or did not finish; the message points at the logs."""


@dataclass(frozen=True)
class FederatedRun:
    """Where a finished run left its results."""

    job_id: str
    env: str
    out: Path
    result_dir: Path
    global_model: Path | None  # FL_global_model.pt; with HE the encrypted FL_global_model.ckks
    site_outputs: dict[str, Path]
    tracking_uri: str
    seconds: float
    rounds: int
    he: bool
    status: str | None = None
    logs: Path | None = None
    kits: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)


def tracking_uri_for(config: ConsortiumConfig, *, out: Path) -> str:
    """``tracking.uri`` from consortium.yaml, else a SQLite store in the run folder."""
    return config.tracking.uri or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def run_federated(
    config: ConsortiumConfig,
    *,
    env: Literal["sim", "poc"],
    out: Path,
    rounds: int | None = None,
    he: bool = False,
    progress: Progress | None = None,
    timeout: float = 3600.0,
    he_contexts: tuple[bytes, bytes] | None = None,
    privacy_policy: dict[str, Any] | None = None,
) -> FederatedRun:
    """Build the job for ``config`` and run it to the end in the simulator or in POC.

    Parameters
    ----------
    config
        The consortium (read with :func:`consortium.config.load_config`; its ``source`` is the file the
        sites read).
    env
        ``"sim"``: FLARE's simulator, one process per member. ``"poc"``: a real FLARE server and one
        client process per member on loopback (mTLS), on the operator's ports from ``consortium.yaml``.
    out
        The run folder; created if needed. Nothing is written elsewhere.
    rounds
        Overrides ``training.rounds``.
    he
        Aggregate under homomorphic encryption (POC only; the HE recipe refuses the simulator).
    progress
        Called as ``progress(rounds_done, total, info)`` each time every site has finished one more
        round; ``info["sites"]`` holds each site's latest ``metrics.jsonl`` record. Called from a
        watcher thread.
    timeout
        Seconds to wait for a POC job before aborting it.
    he_contexts
        With ``he``: the custodian's ``(client_context, server_context)`` (``jobs.he.context``); by
        default a fresh pair is made here, which is right for a one-machine demo only.
    privacy_policy
        With HE on POC: the member site policy written to each client kit's ``local/privacy.json``
        (``provisioning.policies.privacy_policy(config)``, which defines the job's scope
        ``consortium-he``); by default the kits have none and FLARE ignores the job's scope.

    Raises
    ------
    FederatedRunError
        The job failed, timed out or a site did not finish every round; the message names the logs.
    """
    if env not in ("sim", "poc"):
        raise ValueError(f"env='{env}'; use 'sim' (FLARE simulator) or 'poc' (FLARE proof of concept)")
    if he and env == "sim":
        raise ValueError("HE aggregation cannot run in FLARE's simulator (no startup kits for the HE contexts); "
                         "use env='poc', or turn HE off (privacy.he.enabled: false)")
    if config.source is None:
        raise ValueError("config has no source file; load it with consortium.config.load_config(path)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    total = int(rounds if rounds is not None else config.training.rounds)
    sites_root = out / "sites"
    tracking_uri = tracking_uri_for(config, out=out)
    recipe = build_recipe(
        config, config_path=config.source, outputs=sites_root, rounds=total, he=he, tracking_uri=tracking_uri
    )
    members = [m.name for m in config.members]
    folders = {name: site_folder(sites_root, name) for name in members}
    started = time.perf_counter()
    with _project_importable(), _watch(folders, total, progress):
        if env == "sim":
            job_id, result_dir, status, logs = _run_sim(recipe, members, out / "flare")
        else:
            job_id, result_dir, status, logs = _run_poc(
                recipe, config, out / "flare", he=he, timeout=timeout, he_contexts=he_contexts,
                privacy_policy=privacy_policy,
            )
    seconds = time.perf_counter() - started
    metrics = {name: read_metrics(folder) for name, folder in folders.items()}
    unfinished = {name: len(records) for name, records in metrics.items() if len(records) < total}
    if unfinished:
        raise FederatedRunError(
            f"job {job_id} ({status or 'no status'}): sites did not finish all {total} rounds "
            f"(rounds done: {unfinished}); see the logs under {logs}{_first_errors(logs, job_id)}"
        )
    return FederatedRun(
        job_id=job_id,
        env=env,
        out=out,
        result_dir=result_dir,
        global_model=_find(result_dir, ENCRYPTED_MODEL_FILE if he else GLOBAL_MODEL_FILE),
        site_outputs=folders,
        tracking_uri=tracking_uri,
        seconds=seconds,
        rounds=total,
        he=he,
        status=status,
        logs=logs,
        kits=_poc_kits(logs, config) if env == "poc" else {},
        metrics=metrics,
    )


# -- simulator ------------------------------------------------------------------------------------


def _run_sim(recipe, members: list[str], workspace: Path) -> tuple[str, Path, str | None, Path]:
    from nvflare.recipe import SimEnv

    sim = SimEnv(clients=members, workspace_root=str(workspace))
    logs = workspace / recipe.name
    try:
        run = recipe.run(sim)
    except RuntimeError as exc:
        raise FederatedRunError(
            f"simulated job failed; logs in {logs}/server/log.txt and {logs}/<member>/log.txt"
            f"{_first_errors(logs, recipe.name)}"
        ) from exc
    # the simulator has returned: the job is over (Run.get_result would only print that status is unknown)
    return run.get_job_id(), logs, "FINISHED", logs


# -- POC ------------------------------------------------------------------------------------------


def _run_poc(
    recipe,
    config: ConsortiumConfig,
    workspace: Path,
    *,
    he: bool,
    timeout: float,
    he_contexts: tuple[bytes, bytes] | None,
    privacy_policy: dict[str, Any] | None,
):
    _check_ports_free(config)
    workspace.mkdir(parents=True, exist_ok=True)
    project_file = workspace / "project.yml"
    project_file.write_text(yaml.safe_dump(poc_project(config), sort_keys=False))
    poc_workspace = workspace / "poc"
    with _environ(POC_WORKSPACE_ENV, str(poc_workspace)):  # PocEnv reads its workspace from here
        poc = _poc_env(config, project_file, he=he, he_contexts=he_contexts, privacy_policy=privacy_policy)
    job_id = None
    try:
        run = recipe.run(poc)
        job_id = run.get_job_id()
        result = run.get_result(timeout=timeout, clean_up=False)
        status = run.get_status()
        if result is None:
            run.abort()
            raise FederatedRunError(
                f"POC job {job_id} did not finish within {timeout:.0f} s (status {status}); "
                f"logs under {poc_workspace}"
            )
        if status and "COMPLETED" not in status:
            raise FederatedRunError(
                f"POC job {job_id} ended with status {status}; logs under {poc_workspace}"
                f"{_first_errors(poc_workspace, job_id)}"
            )
        return job_id, Path(result), status, poc_workspace
    except FederatedRunError:
        raise
    except Exception as exc:
        raise FederatedRunError(
            f"POC job {job_id or '(not submitted)'} failed: {exc}; logs under {poc_workspace}"
            f"{_first_errors(poc_workspace, job_id) if job_id else ''}"
        ) from exc
    finally:
        poc.stop(clean_up=False)  # idempotent: no server or client process outlives the run


def _poc_env(config, project_file: Path, *, he: bool, he_contexts, privacy_policy):
    members = [m.name for m in config.members]
    # PocEnv defaults to num_clients=2 and refuses a clients list of another length
    common = {"clients": members, "num_clients": len(members), "project_conf_path": str(project_file),
              "username": POC_ADMIN}
    if not he:
        from nvflare.recipe import PocEnv

        return PocEnv(**common)
    # not PocEnv(use_he=True): NVFlare's HEBuilder would make the operator hold the secret key
    from jobs.he.context import make_contexts
    from jobs.he.poc import HEPocEnv

    if he_contexts is None:
        log.warning("no custodian contexts given: making a fresh HE key pair for this one-machine POC run")
        he_contexts = make_contexts(config.privacy.he)
    client_context, server_context = he_contexts
    return HEPocEnv(
        server_context=server_context, client_context=client_context, privacy_policy=privacy_policy, **common
    )


def poc_project(config: ConsortiumConfig) -> dict[str, Any]:
    """A POC ``project.yml``: NVFlare's default builders (no HEBuilder), the members as clients, the
    operator's ports."""
    import nvflare.lighter

    template = Path(nvflare.lighter.__file__).with_name("dummy_project.yml")
    project = yaml.safe_load(template.read_text())
    project["name"] = config.name
    operator = config.operator
    server = {
        "name": "server",
        "type": "server",
        "org": _flare_org(operator.org),
        "fed_learn_port": operator.fl_port,
        "admin_port": operator.admin_port,
    }
    clients = [{"name": m.name, "type": "client", "org": _flare_org(m.org)} for m in config.members]
    admins = [p for p in project["participants"] if p["type"] == "admin" and p["name"] == POC_ADMIN]
    project["participants"] = [server, *clients, *admins]
    return project


def _flare_org(org: str) -> str:
    """FLARE's provisioner takes organisation names of ``[A-Za-z0-9_]`` only ("Pharma A" -> "Pharma_A")."""
    return re.sub(r"[^A-Za-z0-9_]", "_", org) or "org"


def _check_ports_free(config: ConsortiumConfig) -> None:
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


# -- shared helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _project_importable() -> Iterator[None]:
    """FLARE's server and client processes must import ``models``, ``omics``, ``jobs``, ``consortium``.

    They inherit this process's environment; put the project's root on their ``PYTHONPATH`` for the
    run (a no-op once the project is pip-installed, where it is importable anyway).
    """
    root = str(Path(jobs.__file__).resolve().parent.parent)
    current = os.environ.get("PYTHONPATH", "")
    if root in current.split(os.pathsep):
        yield
        return
    with _environ("PYTHONPATH", os.pathsep.join(p for p in (root, current) if p)):
        yield


@contextlib.contextmanager
def _watch(folders: dict[str, Path], total: int, progress: Progress | None) -> Iterator[None]:
    """Report rounds as the sites append to their metrics.jsonl, from a thread, while the job runs."""
    if progress is None:
        yield
        return
    done = threading.Event()
    reported = 0

    def poll() -> None:
        nonlocal reported
        records = {name: read_metrics(folder) for name, folder in folders.items()}
        finished = min(len(r) for r in records.values())
        if finished > reported:
            reported = finished
            latest = {name: r[-1] for name, r in records.items() if r}
            try:
                progress(finished, total, {"sites": latest})
            except Exception:  # a broken progress display must not break the run
                log.exception("progress callback failed")

    def loop() -> None:
        while not done.wait(POLL_SECONDS):
            poll()

    watcher = threading.Thread(target=loop, name="federated-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        poll()


def _poc_kits(poc_workspace: Path, config: ConsortiumConfig) -> dict[str, Path]:
    """The POC startup kit of the server and of each member (an HE member's holds its client context)."""
    prod = sorted((poc_workspace / config.name).glob("prod_*"))
    if not prod:
        return {}
    names = ["server", *(m.name for m in config.members)]
    return {name: prod[-1] / name for name in names if (prod[-1] / name).is_dir()}


def _first_errors(folder: Path | None, job_id: str, *, limit: int = 4) -> str:
    """The exceptions the job's FLARE logs end their tracebacks with, causes before the aborts they
    triggered; shown with a failure (the full logs stay on disk)."""
    if folder is None or not folder.exists():
        return ""
    found: dict[str, str] = {}
    for log_file in sorted(folder.rglob("log.txt")):
        if folder.name != job_id and job_id not in log_file.parts:  # POC keeps one folder per job
            continue
        site = log_file.relative_to(folder).parts[0]
        for line in log_file.read_text(errors="replace").splitlines():
            if _EXCEPTION_LINE.match(line):
                found.setdefault(f"  {site}: {line.strip()[:300]}", line)
    ranked = sorted(found, key=lambda shown: "abort" in shown)  # stable: log order within each group
    return "\nerrors in the logs:\n" + "\n".join(ranked[:limit]) if ranked else ""


def _find(folder: Path, name: str) -> Path | None:
    matches = sorted(Path(folder).rglob(name)) if folder.exists() else []
    return matches[0] if matches else None
