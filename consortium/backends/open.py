"""The one place that picks a backend by environment name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from consortium.backends.admin_kit import AdminKit
from consortium.backends.base import ENVIRONMENTS, Backend
from consortium.backends.kits import KitsBackend
from consortium.backends.poc import PocBackend
from consortium.backends.sim import SimBackend
from consortium.reaper import reaper_for
from schema.config import ConsortiumConfig


@contextlib.contextmanager
def open_backend(
    config: ConsortiumConfig,
    *,
    env: str,
    workspace: Path,
    keys: Path | None = None,
    started: Callable[[], None] | None = None,
    kit: AdminKit | None = None,
) -> Iterator[Backend]:
    """The backend for ``env``, working under ``workspace``; nothing starts before the first job is
    submitted. On the way out it is closed: at once after an error or an interrupt, else once its last
    job has ended. Should the command itself die (even by kill -9), a watchdog ends every FLARE process
    under ``workspace``. ``started`` is called once a job's server runs (this process then only waits);
    ``keys``: the custodian's HE key folder, installed into POC's kits; ``kit``: the admin startup kit
    that submits to a running provisioned consortium (``kits``)."""
    if env == "sim":
        backend: Backend = SimBackend(config, workspace, started=started)
    elif env == "poc":
        backend = PocBackend(config, workspace, keys=keys)
    elif env == "kits" and kit is not None:
        backend = KitsBackend(config, workspace, kit=kit)
    else:  # the run plan refuses it first
        raise ValueError(f"env={env!r}: use one of {', '.join(ENVIRONMENTS)} (kits with an admin kit)")
    with reaper_for(workspace):
        try:
            yield backend
        except BaseException:
            backend.close(failed=True)
            raise
        backend.close(failed=False)
