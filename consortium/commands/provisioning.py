"""``consortium provision``, ``consortium add-member`` and ``consortium keys create|install|verify``.

The operator's admin runs ``provision`` and ``add-member``; a member's key custodian runs ``keys`` (on
its own machine: the operator must never see ``client_context.tenseal``). Every command appends what it
did to an audit log, by default ``audit.jsonl`` in the kits (or keys) folder.

NVFlare and TenSEAL are imported inside the commands, so the CLI starts without them. With ``--json`` a
command prints one JSON object on stdout and its notes on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from consortium.console import Console
from schema.names import HE_SCOPE

if TYPE_CHECKING:
    from provisioning.he_keys import KeyReport
    from provisioning.kits import ProvisionResult

AUDIT_FILE = "audit.jsonl"

console = Console()
err_console = Console(stderr=True)

_CONFIG = typer.Option(..., "--config", "-c", help="The consortium.yaml file.", dir_okay=False)
_AUDIT = typer.Option(None, "--audit", help="Audit log to append to (default: audit.jsonl in the output folder).")
_JSON = typer.Option(False, "--json", help="Print the result as one JSON object (notes go to stderr).")


def _record(path: Path | None, default_folder: Path, event: str, *, as_json: bool = False, **details) -> None:
    """Append to the audit log; on a new log, say where its signing key is and what to record elsewhere."""
    from consortium.audit import AuditLog, key_fingerprint, load_public_key

    log = AuditLog(path if path is not None else Path(default_folder) / AUDIT_FILE)
    if log.append(event, **details)["index"] == 0:
        fingerprint = key_fingerprint(load_public_key(log.public_key_path))
        (err_console if as_json else console).print(
            Text(
                f"new audit log {log.path}: signed with {log.key_path} (keep it private). Record its public key "
                f"{log.public_key_path} or fingerprint {fingerprint} elsewhere, and verify against that copy"
            )
        )


def provision_command(
    config: Path = _CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the kits, outside any git repository."),
    audit: Path | None = _AUDIT,
    as_json: bool = _JSON,
) -> None:
    """Provision startup kits (server, one per member, one per admin) with site policies; no HE keys."""
    from consortium.audit import EVENT_PROVISIONED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    with (err_console if as_json else console).status("provisioning startup kits with NVFlare..."):
        result = kits.provision(consortium, out=out)
    _record(audit, result.out, EVENT_PROVISIONED, as_json=as_json, config=str(consortium.source), **result.summary())
    if as_json:
        _echo_json({**_kits_dict(result), "scope": HE_SCOPE, "ca_state": str(result.out / kits.CA_STATE_DIR)})
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
        f"Keep {result.out / kits.CA_STATE_DIR} with the operator; never ship it."
    )


def add_member_command(
    config: Path = _CONFIG,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder written by 'consortium provision'."),
    member: str = typer.Option(..., "--member", help="The new member's name, already added to consortium.yaml."),
    audit: Path | None = _AUDIT,
    as_json: bool = _JSON,
) -> None:
    """Add a member to existing kits, reusing the root CA; no other site's kit or HE key changes."""
    from consortium.audit import EVENT_MEMBER_ADDED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    result = kits.add_member(consortium, kits=kits_dir, member=member)
    _record(audit, result.out, EVENT_MEMBER_ADDED, as_json=as_json, member=member, **result.summary())
    if as_json:
        _echo_json({**_kits_dict(result), "added": member})
        return
    console.print(f"Added '{member}': site kit {result.members[member]}, lead kit {', '.join(result.admins)}.")
    console.print(
        "The new site has no HE context yet. The key custodian installs the EXISTING one (no site is "
        f"re-keyed): consortium keys install --config {config} --kits {result.out} "
        f"--keys KEYDIR --member {member}"
    )


keys_app = typer.Typer(help="The HE key ceremony, run by a member's key custodian (never the operator).")


@keys_app.command("create")
def keys_create(
    config: Path = _CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the key pair, outside any git repository."),
    audit: Path | None = _AUDIT,
    as_json: bool = _JSON,
) -> None:
    """Create the consortium's CKKS key pair: a secret context for members, a public one for the server."""
    from consortium.audit import EVENT_KEYS_CREATED
    from provisioning import he_keys, kits
    from schema.config import load_config

    consortium = load_config(config)
    kits.refuse_inside_git(Path(out).resolve(), what="HE keys")
    with (err_console if as_json else console).status("creating the CKKS key pair..."):
        keyset = he_keys.create_keys(consortium.privacy.he, out=out)
    _record(
        audit,
        out,
        EVENT_KEYS_CREATED,
        as_json=as_json,
        fingerprint=keyset.fingerprint,
        keys=str(Path(out).resolve()),
        **_he_params(consortium),
    )
    if as_json:
        _echo_json(
            {
                "secret_context": str(keyset.secret_context),
                "public_context": str(keyset.public_context),
                "manifest": str(keyset.manifest),
                "fingerprint": keyset.fingerprint,
                **_he_params(consortium),
            }
        )
        return
    console.print(f"Secret context (members only): {keyset.secret_context}")
    console.print(f"Public context (server):       {keyset.public_context}")
    console.print(f"Public fingerprint: [bold]{keyset.fingerprint}[/]")


@keys_app.command("install")
def keys_install(
    config: Path = _CONFIG,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder written by 'consortium provision'."),
    keys: Path = typer.Option(..., "--keys", help="The folder written by 'consortium keys create'."),
    member: list[str] | None = typer.Option(
        None, "--member", help="Install only into this member's kit (repeatable), e.g. after add-member."
    ),
    audit: Path | None = _AUDIT,
    as_json: bool = _JSON,
) -> None:
    """Install the secret context into member kits and the public context into the server kit."""
    from consortium.audit import EVENT_KEYS_INSTALLED
    from provisioning import he_keys
    from schema.config import load_config

    consortium = load_config(config)
    installed = he_keys.install_keys(kits_dir, keys, config=consortium, members=member or None)
    report = he_keys.verify_keys(kits_dir, config=consortium)
    fingerprint = he_keys.public_fingerprint(he_keys.load_context(Path(keys) / he_keys.SERVER_CONTEXT))
    _record(
        audit,
        kits_dir,
        EVENT_KEYS_INSTALLED,
        as_json=as_json,
        fingerprint=fingerprint,
        sites=[p.parent.parent.name for p in installed],
        files=[str(p) for p in installed],
    )
    if as_json:
        _echo_json({"installed": [str(p) for p in installed], "verification": _key_report_dict(report)})
        report.raise_for_failure()
        return
    for path in installed:
        console.print(f"installed {path}")
    _print_report(report)
    report.raise_for_failure()


@keys_app.command("verify")
def keys_verify(
    config: Path = _CONFIG,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder to check."),
    site: list[str] | None = typer.Option(
        None, "--site", help="Check only this kit (server host or member name; repeatable)."
    ),
    fingerprint: str | None = typer.Option(
        None, "--fingerprint", help="The public fingerprint expected (from the audit log or he_context.json)."
    ),
    workspace: Path | None = typer.Option(
        None, "--workspace", help="The server's running workspace: searched for secret contexts like its kit."
    ),
    audit: Path | None = _AUDIT,
    as_json: bool = _JSON,
) -> None:
    """Prove the server kit holds no secret key and every site shares one key pair (exit 1 otherwise).

    Every file of the server kit (and of --workspace) is parsed as a TenSEAL context, whatever its name.
    """
    from consortium.audit import EVENT_KEYS_VERIFIED
    from provisioning import he_keys
    from schema.config import load_config

    consortium = load_config(config)
    report = he_keys.verify_keys(
        kits_dir, config=consortium, sites=site or None, fingerprint=fingerprint, workspace=workspace
    )
    _record(
        audit,
        kits_dir,
        EVENT_KEYS_VERIFIED,
        as_json=as_json,
        ok=report.ok,
        fingerprint=report.fingerprint,
        scanned=report.scanned,
        findings=[f"{f.path}: {f.problem}" for f in report.findings],
    )
    if as_json:
        _echo_json(_key_report_dict(report))
    else:
        _print_report(report)
    report.raise_for_failure()


def _echo_json(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2))


def _kits_dict(result: ProvisionResult) -> dict:
    return {
        "out": str(result.out),
        "project_file": str(result.project_file),
        "server": str(result.server),
        "members": {name: str(path) for name, path in result.members.items()},
        "admins": {name: str(path) for name, path in result.admins.items()},
    }


def _key_report_dict(report: KeyReport) -> dict:
    return {
        "ok": report.ok,
        "fingerprint": report.fingerprint,
        "checked": dict(report.checked),
        "scanned": report.scanned,
        "skipped": [str(p) for p in report.skipped],
        "findings": [{"path": str(f.path), "problem": f.problem} for f in report.findings],
    }


def _print_report(report: KeyReport) -> None:
    from provisioning.he_keys import MAX_SCAN_BYTES

    if report.skipped:
        console.print(
            Text(
                f"note: {len(report.skipped)} file(s) over {MAX_SCAN_BYTES // 2**20} MB not parsed, e.g. "
                f"{report.skipped[0]}; check them by hand"
            )
        )
    if report.ok:
        table = Table("site", "context", title="HE contexts")
        for site, kind in report.checked.items():
            table.add_row(Text(site), kind)
        console.print(table)
        console.print(
            f"[green]ok[/]: one key pair, public fingerprint [bold]{report.fingerprint}[/]; "
            f"{report.scanned} server files searched, no secret key"
        )
        return
    table = Table("file", "problem", title="HE key verification: findings", show_lines=True)
    for finding in report.findings:
        table.add_row(Text(str(finding.path)), Text(finding.problem))
    console.print(table)


def _he_params(consortium) -> dict:
    he = consortium.privacy.he
    return {
        "poly_modulus_degree": he.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(he.coeff_mod_bit_sizes),
        "global_scale_bits": he.global_scale_bits,
    }


def register(app: typer.Typer) -> None:
    app.command("provision")(provision_command)
    app.command("add-member")(add_member_command)
    app.add_typer(keys_app, name="keys")
