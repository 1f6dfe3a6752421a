"""A POC system on this machine: NVFlare's own ``nvflare poc`` tooling driven through its public command
line, with the project that :mod:`provisioning.project` builds for production and the site policies of
:mod:`provisioning.policies`; under HE the member key custodian's contexts (never NVFlare's HEBuilder)
are installed into the kits with :func:`provisioning.he_keys.install_keys`, and under secure aggregation
each member kit gets its mask key and the members' list
(:func:`provisioning.mask_keys.ceremony_on_one_machine`: one machine plays every member).

Everything lies under the ``workspace`` folder given: ``project.yml`` and the POC workspace (kits, logs,
job results). Also here: what the command can see of the server on this machine (its ports), and the
messages that name a site that did not come up or a server that stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from consortium.backends.logs import first_errors, site_log
from consortium.backends.ports import check_ports_free
from consortium.backends.threads import shared_threads
from consortium.flare_env import FederatedRunError
from consortium.processes import stop_processes_under
from consortium.results import JobResults, read_records
from provisioning.he_keys import install_keys
from provisioning.mask_keys import ceremony_on_one_machine
from provisioning.policies import write_site_policies
from provisioning.project import build_project, member_lead
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

POC_WORKSPACE_ENV = "NVFLARE_POC_WORKSPACE"


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
    if config.secure_aggregation():
        # one machine plays every member: each kit's mask key made in its own startup/, the list in each
        ceremony_on_one_machine(prod, config=config)
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
            f"server '{config.operator.host}' is not up ({reason}); its log: {site_log(prod, config.operator.host)}"
        )
    for member in config.members:
        member_log = prod / member.name / "log.txt"
        registered = member_log.exists() and "Successfully registered client" in member_log.read_text(errors="replace")
        if not registered:
            lines.append(
                f"member '{member.name}' did not register with the server; its log: {site_log(prod, member.name)}"
            )
    return "\n".join(lines) or f"every process came up late; the logs are under {prod}"


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


def server_stopped(config: ConsortiumConfig) -> str | None:
    """Two looks a poll apart, so a server restarting its listener is not taken for a dead one."""
    if server_down(config) is None:
        return None
    time.sleep(1.0)
    return server_down(config)


def server_stopped_message(config: ConsortiumConfig, prod: Path, job_id: str | None) -> str:
    server_log = prod / config.operator.host / "log.txt"
    return (
        f"the FLARE server '{config.operator.host}' stopped while job {job_id} was running "
        f"({server_down(config) or 'it stopped answering'}); the job cannot finish without it. "
        f"The server's log: {server_log}{first_errors(prod, job_id)}\n"
        "Every FLARE process this run started has been stopped"
    )


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
