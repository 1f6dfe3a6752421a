"""The member sites' executor for a job that ships no code: NVFlare's Client API executor running the
client script of the ``jobs`` package installed at the site.

Leads have no ``byoc`` right on provisioned kits (:mod:`provisioning.policies`), so the exported job
(:func:`jobs.recipe.export_job`) carries no ``custom/`` folder; each site builds this class from its
own installation (its ``local/resources.json`` allows the ``jobs`` package) and finds the script there.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

CLIENT_MODULE = "jobs.client"


def installed_client_script() -> str:
    """Path of this installation's ``jobs/client.py`` (found without importing it)."""
    spec = importlib.util.find_spec(CLIENT_MODULE)
    if spec is None or not spec.origin:
        raise ImportError(f"{CLIENT_MODULE} is not installed at this site; install the consortium package")
    return spec.origin


class InstalledClientScript(ClientAPIExecutor):
    """:class:`ClientAPIExecutor` (in-process) whose script is the installed :mod:`jobs.client`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("task_script_path", None)
        super().__init__(task_script_path=installed_client_script(), **kwargs)
