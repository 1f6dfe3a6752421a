"""consortium.yaml -> NVFlare ``project.yml`` (api_version 3).

One server (the operator's host, in the operator's org), one client per member, and the admins: the
operator's ``project_admin`` and each member's ``lead``. HEBuilder is deliberately absent: whoever runs
it generates every client's HE secret key, and the neutral operator must never hold one. The key
ceremony in :mod:`provisioning.he_keys` replaces it.
"""

from __future__ import annotations

from nvflare.apis.utils.format_check import name_check

from provisioning.errors import ProvisioningError
from schema.config import ConsortiumConfig, Member

ROLE_PROJECT_ADMIN = "project_admin"
ROLE_LEAD = "lead"

BUILDERS = [
    {
        "path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
        "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]},
    },
    {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
    {"path": "nvflare.lighter.impl.cert.CertBuilder"},
    {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
]


def member_lead(member: Member) -> str:
    """The member's lead (admin user name): ``member.admin`` or ``lead@<member name>.org``."""
    return member.admin or f"lead@{member.name}.org"


def build_project(config: ConsortiumConfig) -> dict:
    """The NVFlare ``project.yml`` content for ``config``, as a dict ready for ``yaml.safe_dump``."""
    operator = config.operator
    participants: list[dict] = [
        {
            "name": operator.host,
            "type": "server",
            "org": operator.org,
            "fed_learn_port": operator.fl_port,
            "admin_port": operator.admin_port,
        }
    ]
    participants += [{"name": m.name, "type": "client", "org": m.org} for m in config.members]
    participants.append({"name": operator.admin, "type": "admin", "org": operator.org, "role": ROLE_PROJECT_ADMIN})
    participants += [{"name": member_lead(m), "type": "admin", "org": m.org, "role": ROLE_LEAD} for m in config.members]
    _check_names(config, participants)
    return {
        "api_version": 3,
        "name": config.name,
        "description": f"Biomarker consortium '{config.name}' (generated from consortium.yaml; do not edit)",
        "participants": participants,
        "builders": [dict(b) for b in BUILDERS],
    }


_FIELD_OF = {
    "server": "operator.host",
    "client": "members[].name",
    "admin": "operator.admin / members[].admin",
}
_FIX = {
    "server": "use a host name such as 'fl.operator.org' or 'localhost'",
    "client": "use letters, digits, '-' or '_'",
    "admin": "use an e-mail address such as 'lead@pharma-a.org'",
}


def _check_names(config: ConsortiumConfig, participants: list[dict]) -> None:
    """Reject names NVFlare would refuse later, naming the consortium.yaml field and the fix."""
    problems = []
    for participant in participants:
        kind = participant["type"]
        invalid, _ = name_check(participant["name"], kind)
        if invalid:
            problems.append(f"{_FIELD_OF[kind]} = {participant['name']!r}: {_FIX[kind]}")
        # orgs are checked when consortium.yaml is read (schema.config), with NVFlare's own rule
    names = [p["name"] for p in participants]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        problems.append(f"participant names must be unique across server, members and admins; repeated: {clashes}")
    if problems:
        source = config.source or "consortium.yaml"
        raise ProvisioningError(f"{source}: cannot provision:\n  " + "\n  ".join(dict.fromkeys(problems)))
