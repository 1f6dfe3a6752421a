"""Startup kits from consortium.yaml, through NVFlare's provisioning API (``nvflare.lighter``).

Layout of a kits folder (the operator keeps it; each participant gets only its own folder)::

    kits/
      project.yml          the NVFlare project, kept for inspection (regenerated, never edited)
      _ca/cert.json        NVFlare provisioning state: the root CA's private key. Operator only; needed
                           to add a member later. Never ship it.
      <server host>/       the operator's server kit (startup/, local/authorization.json)
      <member>/            one kit per member (startup/, local/authorization.json, local/privacy.json)
      <admin e-mail>/      one admin kit per user: the operator's admin and each member's lead
      audit.jsonl          the operator's audit log of these kits (with audit.jsonl.pub, .head: they may travel)
    kits.operator/         beside the kits, never inside them: the operator's private folder
      audit.key            the operator's audit signing key (mode 0600): whoever holds it signs as the operator

Kits hold private TLS keys: :func:`provision` refuses a folder inside a git work tree, and builds in a
temporary sibling that is renamed into place only when complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from nvflare.apis.fl_constant import ConfigVarName
from nvflare.lighter.constants import CtxKey
from nvflare.lighter.prov_utils import prepare_builders
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner

from provisioning.errors import ProvisioningError
from provisioning.policies import write_site_policies
from provisioning.project import build_project, member_lead
from schema.config import ConsortiumConfig

logger = logging.getLogger(__name__)

PROJECT_FILE = "project.yml"
CA_STATE_DIR = "_ca"
OPERATOR_SUFFIX = ".operator"
SERVER_START = Path("startup") / "sub_start.sh"
SERVER_SETTINGS = "--set secure_train=true"  # where NVFlare 2.9's server start script lists its settings


@dataclass
class ProvisionResult:
    """What :func:`provision` or :func:`add_member` wrote."""

    out: Path
    project_file: Path
    server: Path
    members: dict[str, Path] = field(default_factory=dict)
    admins: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-friendly summary for the audit log (names and paths, no key material)."""
        return {
            "out": str(self.out),
            "server": self.server.name,
            "members": sorted(self.members),
            "admins": sorted(self.admins),
        }


def git_work_tree(path: Path) -> Path | None:
    """The git work tree containing ``path`` (which need not exist yet), or None."""
    for candidate in [path, *path.parents]:
        if (candidate / ".git").exists():
            return candidate
    return None


def operator_folder(kits: Path) -> Path:
    """``<kits>.operator/``: the operator's private folder beside the kits folder, never inside it.

    The kits folder is handed over (to the key custodian for the ceremony, a kit to each participant),
    so what only the operator may hold, such as its audit signing key, lies beside it.
    """
    kits = Path(kits).resolve()
    return kits.with_name(kits.name + OPERATOR_SUFFIX)


def refuse_inside_git(path: Path, *, what: str) -> None:
    """Raise :class:`ProvisioningError` when ``path`` lies inside a git work tree."""
    tree = git_work_tree(path.resolve())
    if tree is not None:
        raise ProvisioningError(
            f"{path}: refusing to write {what} inside the git work tree '{tree}' (they hold private keys "
            "and must never be committed); choose a folder outside the repository, e.g. ~/consortium-kits"
        )


def provision(config: ConsortiumConfig, *, out: Path) -> ProvisionResult:
    """Write startup kits for the server, every member and every admin into ``out``.

    ``out`` must not exist yet (or be empty) and must lie outside any git work tree. On failure nothing
    is left at ``out``.
    """
    out = Path(out).resolve()
    refuse_inside_git(out, what="startup kits")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisioningError(
            f"{out}: already exists and is not empty; kits are never overwritten in place. Use a new folder, "
            "or 'consortium add-member' to add a member to existing kits"
        )
    project = build_project(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        final = staging / "kits"
        final.mkdir()
        prod = _run_nvflare(project, workspace=staging / "nvflare", ca_state=None)
        for kit in prod.iterdir():
            if kit.is_dir():
                shutil.move(str(kit), final / kit.name)
        shutil.copytree(_state_dir(staging / "nvflare", project), final / CA_STATE_DIR)
        _write_policies(final, config, [m.name for m in config.members], server=True, location=out)
        bound_outcome_wait(final / config.operator.host, seconds=config.training.round_deadline)
        _write_project_file(final / PROJECT_FILE, project)
        if out.exists():
            out.rmdir()
        final.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("provisioned %d kits into %s", len(project["participants"]), out)
    return _result(config, out, members=[m.name for m in config.members], with_operator=True)


def add_member(config: ConsortiumConfig, *, kits: Path, member: str) -> ProvisionResult:
    """Add one member (already in ``config``) to existing kits, reusing their root CA.

    Only the new member's site kit and its lead's admin kit are written; every existing kit, certificate
    and HE context stays as it is (the server trusts any client certificate signed by the same CA, so
    its kit needs no change). The new site gets no HE context here: the key custodian installs the
    existing one with ``consortium keys install --member NAME``.
    """
    kits = Path(kits).resolve()
    new = config.member(member)
    ca_state = kits / CA_STATE_DIR / "cert.json"
    if not ca_state.is_file():
        raise ProvisioningError(
            f"{kits}: no {CA_STATE_DIR}/cert.json; add-member needs the kits folder written by "
            "'consortium provision' (it holds the root CA that signs the new member's certificate)"
        )
    lead = member_lead(new)
    for name in (new.name, lead):
        if (kits / name).exists():
            raise ProvisioningError(f"{kits / name}: already exists; '{member}' is already a member of these kits")
    project = build_project(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{kits.name}.add-{member}-", dir=kits.parent))
    try:
        prod = _run_nvflare(project, workspace=staging / "nvflare", ca_state=ca_state.parent)
        _write_policies(prod, config, [new.name], server=False, location=kits)
        for name in (new.name, lead):
            shutil.move(str(prod / name), staging / name)
        new_state = _state_dir(staging / "nvflare", project) / "cert.json"
        _write_project_file(staging / PROJECT_FILE, project)
        # Rename the finished kits in first, then swap the CA state and project.yml atomically.
        for name in (new.name, lead):
            (staging / name).rename(kits / name)
        shutil.copyfile(new_state, staging / "cert.json")
        (staging / "cert.json").replace(ca_state)
        (staging / PROJECT_FILE).replace(kits / PROJECT_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("added member %s to %s", member, kits)
    return _result(config, kits, members=[new.name], with_operator=False)


def bound_outcome_wait(server_kit: Path, *, seconds: float) -> Path:
    """Make the server end a job at most ``seconds`` after its own part ended when a member never reports
    that it ended the job (its link went down mid-run): NVFlare 2.9 keeps such a job RUNNING for its
    ``client_outcome_wait_timeout`` (900 s), far past what a run waits for a job, even when the rounds went
    on without that member (``training.min_members``); then it finishes the job with the server's outcome.
    The server reads the setting from its start command (``--set``) or its environment; it goes into the
    kit's start script. Returns the script."""
    script = server_kit / SERVER_START
    text = script.read_text()
    if SERVER_SETTINGS not in text:
        raise ProvisioningError(
            f"{script}: no '{SERVER_SETTINGS}' in the server's start script; the NVFlare version differs from "
            "the pinned one (setup.cfg): install the pinned version and provision again"
        )
    setting = f"{ConfigVarName.CLIENT_OUTCOME_WAIT_TIMEOUT}={seconds:g}"
    script.write_text(text.replace(SERVER_SETTINGS, f"{SERVER_SETTINGS} {setting}", 1))
    return script


def _run_nvflare(project: dict, *, workspace: Path, ca_state: Path | None) -> Path:
    """Run NVFlare's Provisioner on ``project`` in ``workspace``; return the prod folder."""
    if ca_state is not None:
        shutil.copytree(ca_state, _state_dir(workspace, project))
    nv_project = prepare_project(yaml.safe_load(yaml.safe_dump(project)))
    builders = prepare_builders(project)
    messages = _CollectingLogger()
    ctx = Provisioner(str(workspace), builders).provision(nv_project, logger=messages)
    prod = ctx.get(CtxKey.CURRENT_PROD_DIR)
    if ctx.get(CtxKey.BUILD_ERROR) or not prod:
        detail = "; ".join(messages.errors) or "no detail given"
        raise ProvisioningError(f"NVFlare provisioning failed: {detail}")
    return Path(prod)


def _state_dir(workspace: Path, project: dict) -> Path:
    return workspace / project["name"] / "state"


def _write_policies(
    folder: Path, config: ConsortiumConfig, members: list[str], *, server: bool, location: Path
) -> None:
    """Site policies into the kits under ``folder``, which will live under ``location``."""
    if server:
        host = config.operator.host
        write_site_policies(folder / host, config=config, member_site=False, location=location / host)
    for name in members:
        write_site_policies(folder / name, config=config, member_site=True, location=location / name)


def _write_project_file(path: Path, project: dict) -> None:
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def _result(config: ConsortiumConfig, out: Path, *, members: list[str], with_operator: bool) -> ProvisionResult:
    leads = {member_lead(config.member(name)): out / member_lead(config.member(name)) for name in members}
    admins = ({config.operator.admin: out / config.operator.admin} if with_operator else {}) | leads
    return ProvisionResult(
        out=out,
        project_file=out / PROJECT_FILE,
        server=out / config.operator.host,
        members={name: out / name for name in members},
        admins=admins,
    )


class _CollectingLogger:
    """The logger NVFlare's Provisioner expects (debug/info/warning/error), routed to ``logging``."""

    def __init__(self):
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        logger.debug(msg)

    def info(self, msg: str) -> None:
        logger.info(msg)

    def warning(self, msg: str) -> None:
        logger.warning(msg)

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        logger.error(msg)
