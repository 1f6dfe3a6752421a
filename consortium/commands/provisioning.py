"""``consortium provision`` and ``consortium add-member``; the key ceremony is :mod:`consortium.commands.keys`.

The operator's admin runs ``provision`` and ``add-member``; a member's key custodian runs ``keys`` (on
its own machine: the operator must never see ``client_context.tenseal``). Each party appends what it did
to its own audit log, signed with its own key, which never lies in a folder another party receives:

- the operator: ``<kits>/audit.jsonl``, signed with ``<kits>.operator/audit.key``;
- the custodian: ``<keys>/audit.jsonl``, signed with ``<keys>.custodian/audit.key``; the first entry a
  ceremony command writes records the head of the kits log it was given (``details["follows"]``).

``--audit`` and ``--signing-key`` choose another log or key; a signing key inside the kits folder is
refused.

NVFlare and TenSEAL are imported inside the commands, so the CLI starts without them. With ``--json`` a
command prints one JSON object on stdout and its notes on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from consortium.commands import keys
from consortium.commands.signed_log import (
    AUDIT_FILE,
    AUDIT_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    SIGNING_KEY_OPTION,
    console,
    echo_json,
    notes,
    open_log,
    operator_key,
    record,
)
from schema.names import HE_SCOPE

if TYPE_CHECKING:
    from provisioning.kits import ProvisionResult


def provision_command(
    config: Path = CONFIG_OPTION,
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the kits, outside any git repository."),
    audit: Path | None = AUDIT_OPTION,
    signing_key: Path | None = SIGNING_KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Provision startup kits (server, one per member, one per admin) with site policies; no HE keys."""
    from consortium.audit import EVENT_PROVISIONED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    out = Path(out).resolve()
    log = open_log(audit or out / AUDIT_FILE, signing_key or operator_key(out), kits=out, as_json=as_json)
    with notes(as_json).status("provisioning startup kits with NVFlare..."):
        result = kits.provision(consortium, out=out)
    record(log, EVENT_PROVISIONED, as_json=as_json, config=str(consortium.source), **result.summary())
    if as_json:
        echo_json({**_kits_dict(result), "scope": HE_SCOPE, "ca_state": str(result.out / kits.CA_STATE_DIR)})
        return
    table = Table("kit", "role", "folder", title=f"startup kits for '{consortium.name}'")
    table.add_row(result.server.name, "server (operator)", str(result.server))
    for name, path in result.members.items():
        table.add_row(name, "member site", str(path))
    for name, path in result.admins.items():
        table.add_row(name, "admin", str(path))
    console.print(table)
    console.print(
        f"Site policies written (job scope '{HE_SCOPE}'). Next: the key custodian runs "
        f"'consortium keys create' and 'consortium keys install --kits {result.out}'. "
        f"Keep {result.out / kits.CA_STATE_DIR} and {log.key_path.parent} with the operator; never ship them."
    )
    if consortium.secure_aggregation():
        console.print(
            "Secure aggregation: each member makes its mask key in its own kit and hands on its public file: "
            f"'consortium keys masks --config {config} --kit <its kit> --public DIR', again once DIR holds every "
            "member's file."
        )


def add_member_command(
    config: Path = CONFIG_OPTION,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder written by 'consortium provision'."),
    member: str = typer.Option(..., "--member", help="The new member's name, already added to consortium.yaml."),
    audit: Path | None = AUDIT_OPTION,
    signing_key: Path | None = SIGNING_KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a member to existing kits, reusing the root CA; no other site's kit or HE key changes."""
    from consortium.audit import EVENT_MEMBER_ADDED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    log = open_log(
        audit or Path(kits_dir) / AUDIT_FILE, signing_key or operator_key(kits_dir), kits=kits_dir, as_json=as_json
    )
    result = kits.add_member(consortium, kits=kits_dir, member=member)
    record(log, EVENT_MEMBER_ADDED, as_json=as_json, member=member, **result.summary())
    if as_json:
        echo_json({**_kits_dict(result), "added": member})
        return
    console.print(f"Added '{member}': site kit {result.members[member]}, lead kit {', '.join(result.admins)}.")
    console.print(
        "The new site has no HE context yet. The key custodian installs the EXISTING one (no site is "
        f"re-keyed): consortium keys install --config {config} --kits {result.out} "
        f"--keys KEYDIR --member {member}"
    )
    if consortium.secure_aggregation():
        console.print(
            f"Secure aggregation: '{member}' makes its mask key ('consortium keys masks --config {config} --kit "
            f"<its kit> --public DIR'), then every member installs the longer list (the same command, again)."
        )


def _kits_dict(result: ProvisionResult) -> dict:
    return {
        "out": str(result.out),
        "project_file": str(result.project_file),
        "server": str(result.server),
        "members": {name: str(path) for name, path in result.members.items()},
        "admins": {name: str(path) for name, path in result.admins.items()},
    }


def register(app: typer.Typer) -> None:
    app.command("provision")(provision_command)
    app.command("add-member")(add_member_command)
    app.add_typer(keys.keys_app, name="keys")
