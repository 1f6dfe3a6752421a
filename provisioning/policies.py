"""Site governance written into the kits: ``local/authorization.json`` and ``local/privacy.json``.

Authorization (one policy, written into the server's and every member's kit; each site evaluates it
with its own org, so ``o:site`` means "the user belongs to the org that runs this site"):

- ``project_admin`` (the operator): views everything, operates and inspects only its own site (the
  server: check status, restart, shutdown, remove a client), may abort a stuck job but never deletes,
  clones or submits one. It may download job folders from the server: the job definition, server logs,
  the metrics sent in plaintext and the aggregated model, which under HE is ciphertext the operator
  cannot decrypt. NVFlare's authorization cannot hide from the operator what lies on its own disk, so
  this right grants nothing it does not already have; it is granted openly rather than pretended away.
- ``lead`` (a member's lead): submits jobs; clones, aborts, deletes and downloads only jobs submitted
  by someone of its own org; operates and inspects only its own org's site.
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

from schema.config import ConsortiumConfig
from schema.names import AUTHORIZATION_FILE, HE_SCOPE, PRIVACY_FILE, RESULT_FILTER_PATH

SCOPE = HE_SCOPE

_OWN_ORG_JOBS = "o:submitter"
_OWN_SITE = "o:site"


def authorization_policy() -> dict:
    """The NVFlare ``authorization.json`` content (format 1.0) shared by the server and member sites."""
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": {
                "submit_job": "none",
                "clone_job": "none",
                "manage_job": "none",
                "abort_job": "any",
                "download_job": "any",
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
                "view": "any",
                "operate": _OWN_SITE,
                "shell_commands": _OWN_SITE,
                # consortium jobs ship their client script as custom code
                "byoc": "any",
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


def write_site_policies(kit: Path, *, config: ConsortiumConfig, member_site: bool) -> list[Path]:
    """Write ``local/authorization.json`` (and ``local/privacy.json`` when ``member_site``) into ``kit``."""
    local = kit / "local"
    local.mkdir(parents=True, exist_ok=True)
    written = [local / AUTHORIZATION_FILE]
    written[0].write_text(json.dumps(authorization_policy(), indent=2) + "\n")
    if member_site:
        written.append(local / PRIVACY_FILE)
        written[1].write_text(json.dumps(privacy_policy(config), indent=2) + "\n")
    return written
