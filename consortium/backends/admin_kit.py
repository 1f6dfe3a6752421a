"""An admin startup kit of a provisioned consortium, and the member secret context beside it: what a
``kits`` run is planned with (:class:`~consortium.run_plan.RunPlan`), light enough to plan without NVFlare's
admin API. The backend that submits with it: :mod:`consortium.backends.kits`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from consortium.backends.base import ADMIN_CONFIG
from provisioning.mask_keys import verify_masks
from provisioning.project import member_lead
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE
from schema.writes import atomic_write

LOGIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class AdminKit:
    """An admin startup kit (``folder``, holding ``startup/fed_admin.json``) and the user it logs in as."""

    folder: Path
    username: str

    @classmethod
    def at(cls, folder: Path, *, username: str | None = None) -> AdminKit:
        """The kit in ``folder``; ``username`` defaults to the folder's name (``consortium provision`` names
        each admin kit after its user). A folder that is no admin kit is a :class:`UserError`."""
        folder = Path(folder).expanduser().resolve()
        if not (folder / "startup" / ADMIN_CONFIG).is_file():
            raise UserError(
                f"--startup-kit {folder}: not an admin startup kit (no startup/{ADMIN_CONFIG}); give the folder "
                "'consortium provision' wrote for a member's lead, e.g. KITS/lead@pharma-a.org"
            )
        return cls(folder, username or folder.name)


def member_context(kit: AdminKit, config: ConsortiumConfig) -> Path | None:
    """The secret context of the member whose lead ``kit`` logs in as, from that member's kit beside the
    admin kit; ``None`` where this machine holds none."""
    for member in config.members:
        path = kit.folder.parent / member.name / "startup" / CLIENT_CONTEXT_FILE
        if member_lead(member) == kit.username and path.is_file():
            return path
    return None


def lead_member_startup(kit: AdminKit, config: ConsortiumConfig) -> Path | None:
    """The ``startup/`` of the member whose lead ``kit`` logs in as, beside the admin kit; ``None`` where
    this machine holds no such kit."""
    for member in config.members:
        folder = kit.folder.parent / member.name / "startup"
        if member_lead(member) == kit.username and folder.is_dir():
            return folder
    return None


def mask_key_problems(kit: AdminKit, config: ConsortiumConfig) -> list[str]:
    """Where ``config`` uses secure aggregation: what keeps the member kits beside ``kit`` (those this
    machine holds) from masking, each naming its file; empty when they are ready or none is here."""
    if not config.secure_aggregation():
        return []
    here = [m.name for m in config.members if (kit.folder.parent / m.name / "startup").is_dir()]
    if not here:
        return []
    report = verify_masks(kit.folder.parent, config=config, sites=here)
    return [f"{finding.path}: {finding.problem}" for finding in report.findings]


def install_member_keys(secret: Path, folder: Path) -> Path:
    """The run's key folder from a member kit's secret context: a private copy of it and its public half
    (what the server kit holds), as the run's audit and release read them; returns ``folder``."""
    import tenseal as ts

    data = Path(secret).read_bytes()
    context = ts.context_from(data)
    context.make_context_public()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / CLIENT_CONTEXT_FILE, data, mode=0o600)
    atomic_write(folder / SERVER_CONTEXT_FILE, context.serialize())
    return folder
