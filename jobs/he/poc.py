"""Run the HE job in FLARE's POC mode with the member custodian's contexts, not the operator's.

``PocEnv(use_he=True)`` adds NVFlare's ``HEBuilder`` to POC provisioning: the party that prepares
POC (acting as operator) would make, and hold, every member's secret key, and the kits would be
signed with those contexts. Here POC is prepared *without* ``HEBuilder`` and the custodian's
contexts are written into the kits between ``prepare`` and ``start`` (``PocEnv.deploy`` does both
in one call, so :class:`HEPocEnv` splits it)::

    client, server = make_contexts(config.privacy.he)        # at the custodian
    env = HEPocEnv(clients=members, project_conf_path=project_yml,
                   server_context=server, client_context=client)
    build_he_recipe(config, config_path=..., outputs=...).execute(env)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml
from nvflare.job_config.api import FedJob
from nvflare.recipe import poc_env as _poc
from nvflare.recipe.poc_env import PocEnv
from nvflare.tool.poc.poc_commands import get_prod_dir, setup_service_config
from nvflare.tool.poc.service_constants import FlareServiceConstants

from jobs.he.context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, check_key_pair, context_from_bytes

logger = logging.getLogger(__name__)

HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
SIGNATURE_FILE = "signature.json"


def check_contexts(*, server_context: bytes, client_context: bytes) -> None:
    """Refuse a secret server context, a public-only client context, or two halves of different keys."""
    server = context_from_bytes(server_context, source=SERVER_CONTEXT_FILE, private=False)
    client = context_from_bytes(client_context, source=CLIENT_CONTEXT_FILE, private=True)
    check_key_pair(client, server)


def install_contexts(
    poc_workspace: Path, *, server_context: bytes, client_context: bytes, clients: list[str]
) -> list[Path]:
    """Write the custodian's contexts into a prepared (not yet started) POC workspace.

    ``server_context.tenseal`` goes to the server kit's ``startup/``, ``client_context.tenseal``
    (mode 0600) to each client kit's. A context ``HEBuilder`` left behind is overwritten and its
    entry dropped from the kit's ``signature.json`` (it no longer describes the file); a secret
    context in the server kit is deleted.

    Returns
    -------
    list of Path
        The files written.
    """
    check_contexts(server_context=server_context, client_context=client_context)
    poc_workspace = Path(poc_workspace)
    try:
        project, services = setup_service_config(str(poc_workspace))
    except Exception as exc:  # nvflare raises its CLIException
        raise ValueError(f"{poc_workspace}: not a prepared POC workspace ({exc}); run POC prepare first") from None
    prod = Path(get_prod_dir(str(poc_workspace), project.get("name")))
    server_startup = prod / services[FlareServiceConstants.FLARE_SERVER] / "startup"
    known = set(services[FlareServiceConstants.FLARE_CLIENTS])
    unknown = sorted(set(clients) - known)
    if unknown:
        raise ValueError(f"{prod}: no POC kit for clients {unknown}; the workspace has {sorted(known)}")
    targets = [(server_startup, SERVER_CONTEXT_FILE, server_context, 0o644)]
    targets += [(prod / name / "startup", CLIENT_CONTEXT_FILE, client_context, 0o600) for name in clients]
    missing = [str(folder) for folder, *_ in targets if not folder.is_dir()]
    if missing:
        raise ValueError(f"{missing[0]}: no such startup folder; prepare POC again")

    stray = server_startup / CLIENT_CONTEXT_FILE
    if stray.exists():
        stray.unlink()
        _forget_signature(server_startup, CLIENT_CONTEXT_FILE)
        logger.warning("deleted a secret context from the POC server kit: %s", stray)
    written = []
    for folder, name, data, mode in targets:
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)
        _forget_signature(folder, name)
        written.append(path)
    logger.info("installed the custodian's HE contexts into %d POC kits under %s", len(written), prod)
    return written


def install_privacy_policy(poc_workspace: Path, *, policy: dict, clients: list[str]) -> list[Path]:
    """Write a member site policy (``local/privacy.json``, e.g. ``provisioning.policies.privacy_policy``)
    into the POC client kits, so the sites enforce it (``RequireEncryptedResult``) as in production."""
    poc_workspace = Path(poc_workspace)
    project, _ = setup_service_config(str(poc_workspace))
    prod = Path(get_prod_dir(str(poc_workspace), project.get("name")))
    written = []
    for name in clients:
        local = prod / name / "local"
        if not local.is_dir():
            raise ValueError(f"{local}: no such folder; prepare POC for client '{name}' first")
        (local / "privacy.json").write_text(json.dumps(policy, indent=2) + "\n")
        _forget_signature(local, "privacy.json")
        written.append(local / "privacy.json")
    return written


def _forget_signature(folder: Path, name: str) -> None:
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        return
    entries = json.loads(signature.read_text())
    if entries.pop(name, None) is not None:
        signature.write_text(json.dumps(entries))


class HEPocEnv(PocEnv):
    """``PocEnv`` that prepares POC without ``HEBuilder`` and installs the given contexts before start.

    Parameters
    ----------
    server_context, client_context
        The custodian's serialized contexts (:func:`jobs.he.context.make_contexts`, or the files of
        ``consortium keys create``).
    privacy_policy
        Optional member site policy written to each client kit's ``local/privacy.json``.
    **poc_args
        ``PocEnv`` arguments (``clients``, ``project_conf_path``, ``username``, ...), except ``use_he``.
    """

    def __init__(
        self,
        *,
        server_context: bytes,
        client_context: bytes,
        privacy_policy: dict | None = None,
        **poc_args: Any,
    ) -> None:
        if poc_args.pop("use_he", False):
            raise ValueError(
                "use_he=True would run NVFlare's HEBuilder, which makes the operator hold the secret key; "
                "HEPocEnv installs the custodian's contexts instead: leave use_he out"
            )
        if poc_args.get("clients") and "num_clients" not in poc_args:
            # PocEnv's default num_clients=2 contradicts a clients list of any other length
            poc_args["num_clients"] = len(poc_args["clients"])
        super().__init__(use_he=False, **poc_args)
        check_contexts(server_context=server_context, client_context=client_context)
        if self.project_conf_path:
            builders = (yaml.safe_load(Path(self.project_conf_path).read_text()) or {}).get("builders") or []
            if any(str(b.get("path", "")).endswith("HEBuilder") for b in builders):
                raise ValueError(
                    f"{self.project_conf_path}: remove the builder {HE_BUILDER}; with it POC provisioning makes "
                    "and signs HE keys that the operator holds. HEPocEnv installs the custodian's contexts"
                )
        self._server_context = server_context
        self._client_context = client_context
        self._privacy_policy = privacy_policy

    def deploy(self, job: FedJob) -> str:
        """``PocEnv.deploy`` with :func:`install_contexts` between POC prepare and start."""
        non_local_scripts = _poc.collect_non_local_scripts(job)
        if non_local_scripts:
            raise ValueError(f"the job's scripts must exist on this machine for POC: {non_local_scripts}")
        if self._check_poc_running():
            self.stop(clean_up=True)
        _poc.prepare_poc_provision(
            clients=self.clients or [],
            number_of_clients=self.num_clients,
            workspace=self.poc_workspace,
            docker_image=self.docker_image,
            use_he=False,
            project_conf_path=self.project_conf_path,
            examples_dir=None,
        )
        _, services = setup_service_config(self.poc_workspace)
        clients = list(services[FlareServiceConstants.FLARE_CLIENTS])
        install_contexts(
            Path(self.poc_workspace),
            server_context=self._server_context,
            client_context=self._client_context,
            clients=clients,
        )
        if self._privacy_policy is not None:
            install_privacy_policy(Path(self.poc_workspace), policy=self._privacy_policy, clients=clients)
        _poc._start_poc(
            poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username], services_list=[]
        )
        time.sleep(_poc.SERVICE_START_TIMEOUT)
        return self._get_session_manager().submit_job(job)
