"""Site governance written into the kits: ``local/authorization.json`` and ``local/privacy.json``.

Authorization (one policy, written into the server's and every member's kit; each site evaluates it
with its own org, so ``o:site`` means "the user belongs to the org that runs this site"):

- ``project_admin`` (the operator): views everything, operates and inspects only its own site (the
  server: check status, restart, shutdown, remove a client), may abort a stuck job but never deletes,
  clones or submits one. It may download job folders from the server: the job definition, server logs,
  the metrics sent in plaintext and the aggregated model, which under HE is ciphertext the operator
  cannot decrypt. NVFlare's authorization cannot hide from the operator what lies on its own disk, so
  this right grants nothing it does not already have; it is granted openly rather than pretended away.
  Likewise it reads every job's logs.
- ``lead`` (a member's lead): submits jobs; clones, aborts, deletes, downloads and reads the logs of
  (``nvflare job logs``) only jobs submitted by someone of its own org; operates and inspects only its
  own org's site. No ``byoc``: a job may not ship code (a ``custom/`` folder); the sites run the
  ``jobs`` package they installed, and ``local/resources.json`` lists its classes (:func:`site_resources`).
- ``org_admin`` (optional, a member's site administrator): no job submission; manages and downloads its
  own org's jobs; operates its own org's site.
- ``member``: view only.

Privacy (member sites only): one scope, :data:`SCOPE`, and no ``default_scope``. NVFlare's
``AppDeployer`` refuses to deploy a job whose ``meta.scope`` names a scope the site does not define,
and, with no default scope, one that names none ("privacy scope '' is not allowed"). The scope adds the
task-result filter :data:`RESULT_FILTER_PATH` (written by the jobs layer), which refuses to let a
plaintext trunk leave the site.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.lighter.utils import update_storage_locations

from schema.config import ConsortiumConfig
from schema.names import AUTHORIZATION_FILE, HE_SCOPE, PRIVACY_FILE, RESULT_FILTER_PATH, TLS_REFUSAL_LOG_PATH

SCOPE = HE_SCOPE
RESOURCES_FILE = "resources.json"
DEFAULT_RESOURCES_FILE = "resources.json.default"
CLASS_ALLOW_LIST = "class_allow_list"  # NVFlare's key (nvflare.app_common.widgets.component_path_authorizer)
INSTALLED_PACKAGES = ["jobs.", "models.network.SharedModel"]  # a package prefix ends with "."
"""What a job without custom code may build at a site besides NVFlare's own components: the installed
``jobs`` package (the client executor, filters, aggregator, recorder) and the server's round-0 model."""
TLS_REFUSAL_LOG_ID = "tls_refusal_log"
JOB_LOG_RIGHT = "get_job_log"  # ``nvflare job logs``; NVFlare names the right after the command

_OWN_ORG_JOBS = "o:submitter"
_OWN_SITE = "o:site"


def authorization_policy(*, lead_byoc: bool = False) -> dict:
    """The NVFlare ``authorization.json`` content (format 1.0) shared by the server and member sites.

    ``lead_byoc`` lets leads submit jobs that carry code: only for POC, where one machine plays every
    role and the recipe runs in place (with its code) rather than exported.
    """
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": {
                "submit_job": "none",
                "clone_job": "none",
                "manage_job": "none",
                "abort_job": "any",
                "download_job": "any",
                JOB_LOG_RIGHT: "any",
                "view": "any",
                "operate": _OWN_SITE,
                "shell_commands": _OWN_SITE,
                "byoc": "none",
            },
            "org_admin": {
                "submit_job": "none",
                "clone_job": "none",
                "manage_job": _OWN_ORG_JOBS,
                "download_job": _OWN_ORG_JOBS,
                JOB_LOG_RIGHT: _OWN_ORG_JOBS,
                "view": "any",
                "operate": _OWN_SITE,
                "shell_commands": _OWN_SITE,
                "byoc": "none",
            },
            "lead": {
                "submit_job": "any",
                "clone_job": _OWN_ORG_JOBS,
                "manage_job": _OWN_ORG_JOBS,
                "download_job": _OWN_ORG_JOBS,
                JOB_LOG_RIGHT: _OWN_ORG_JOBS,
                "view": "any",
                "operate": _OWN_SITE,
                "shell_commands": _OWN_SITE,
                # the exported job ships no code (jobs.recipe.export_job): sites run the installed package
                "byoc": "any" if lead_byoc else "none",
            },
            "member": {"view": "any"},
        },
    }


def privacy_policy(config: ConsortiumConfig) -> dict:
    """The ``privacy.json`` of a member site: the consortium scope, its result filter, no default scope."""
    return {
        "scopes": [
            {
                "name": SCOPE,
                "properties": {"consortium": config.name, "he_required": config.privacy.he.enabled},
                "task_result_filters": [{"path": RESULT_FILTER_PATH, "args": {}}],
            }
        ]
    }


def site_resources(kit: Path, *, server: bool, location: Path | None = None) -> dict:
    """The kit's ``local/resources.json``: NVFlare's defaults, plus the classes a job without custom
    code may build (NVFlare's default allow-list and :data:`INSTALLED_PACKAGES`); the server's job
    store and snapshots inside its own workspace (NVFlare's default is ``/tmp/nvflare``): ``location``,
    where the kit will live (default: where it is now); and at the server, the component that logs every
    TLS connection it refuses (:data:`TLS_REFUSAL_LOG_PATH`: a forged member certificate is seen)."""
    local = Path(kit) / "local"
    if server:
        # NVFlare's own helper (``nvflare poc prepare`` uses it): absolute paths under the kit folder
        update_storage_locations(local_dir=str(local), workspace=str(Path(location or kit).resolve()))
        resources = json.loads((local / RESOURCES_FILE).read_text())
        components = [c for c in resources.get("components", []) if c.get("id") != TLS_REFUSAL_LOG_ID]
        resources["components"] = [*components, {"id": TLS_REFUSAL_LOG_ID, "path": TLS_REFUSAL_LOG_PATH, "args": {}}]
    else:
        resources = json.loads((local / DEFAULT_RESOURCES_FILE).read_text())
    allowed = list(resources.get(CLASS_ALLOW_LIST) or DEFAULT_CLASS_ALLOW_LIST)
    resources[CLASS_ALLOW_LIST] = allowed + [p for p in INSTALLED_PACKAGES if p not in allowed]
    return resources


def write_site_policies(
    kit: Path,
    *,
    config: ConsortiumConfig,
    member_site: bool,
    location: Path | None = None,
    lead_byoc: bool = False,
) -> list[Path]:
    """Write ``local/authorization.json`` (and ``local/privacy.json`` when ``member_site``) into ``kit``,
    and ``local/resources.json`` (:func:`site_resources`) when the kit has NVFlare's default one.

    The server's job store is an absolute path inside ``location`` (the kit's final place; default ``kit``).
    """
    local = kit / "local"
    local.mkdir(parents=True, exist_ok=True)
    written = [local / AUTHORIZATION_FILE]
    written[0].write_text(json.dumps(authorization_policy(lead_byoc=lead_byoc), indent=2) + "\n")
    if member_site:
        written.append(local / PRIVACY_FILE)
        written[-1].write_text(json.dumps(privacy_policy(config), indent=2) + "\n")
    if (local / DEFAULT_RESOURCES_FILE).is_file():
        server = not member_site and kit.name == config.operator.host
        resources = site_resources(kit, server=server, location=location)
        written.append(local / RESOURCES_FILE)
        written[-1].write_text(json.dumps(resources, indent=2) + "\n")
    return written
