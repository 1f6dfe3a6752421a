"""``consortium provision``, ``consortium add-member`` and ``consortium keys create|install|verify``.

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

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from consortium.console import Console
from schema.names import HE_SCOPE

if TYPE_CHECKING:
    from consortium.audit import AuditLog
    from provisioning.he_keys import KeyReport
    from provisioning.kits import ProvisionResult

AUDIT_FILE = "audit.jsonl"
SIGNING_KEY_FILE = "audit.key"

console = Console()
err_console = Console(stderr=True)

_CONFIG = typer.Option(..., "--config", "-c", help="The consortium.yaml file.", dir_okay=False)
_AUDIT = typer.Option(None, "--audit", help="Audit log to append to (default: audit.jsonl in the output folder).")
_SIGNING_KEY = typer.Option(
    None,
    "--signing-key",
    help="Your private audit signing key (made on first use). Default: audit.key in <kits>.operator/ for the "
    "operator, in <keys>.custodian/ for the key custodian: beside the folder you hand over, never inside it.",
)
_JSON = typer.Option(False, "--json", help="Print the result as one JSON object (notes go to stderr).")


def _notes(as_json: bool) -> Console:
    return err_console if as_json else console


def _open_log(
    log: Path, key: Path, *, kits: Path | None, follows: tuple[Path | None, ...] = (), as_json: bool = False
) -> AuditLog:
    """The writer's log, before the command changes anything: a key inside the kits folder is refused, a
    key an older version left beside the log is moved to ``key``, and a log whose key is missing fails
    here rather than after the work is done. ``follows``: folders whose logs' heads the first entry records."""
    from consortium.audit import AuditLog
    from consortium.audit.chain import links_to
    from consortium.audit.signing import usage_error

    log, key = Path(log).resolve(), Path(key).resolve()
    if kits is not None and key.is_relative_to(Path(kits).resolve()):
        raise usage_error(
            f"--signing-key {key}: lies inside the kits folder {kits}, which is handed to the key custodian and "
            "the members; whoever holds it could sign entries as you. Keep it outside the kits (leave out "
            "--signing-key for the default, beside the folder)"
        )
    legacy = log.with_name(log.name + ".key")
    if legacy.is_file() and not key.exists():
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(legacy, key)
        _notes(as_json).print(
            Text(
                f"moved the signing key of {log} from beside it ({legacy}) to {key}, out of the folder you hand "
                "over. If that folder left your hands with the key in it, start a new log with a new key"
            )
        )
    if log.is_file() and log.stat().st_size > 0 and not key.exists():
        raise usage_error(
            f"{log} is signed with a key that is not at {key}: pass --signing-key with the key its writer keeps "
            "(a new key would not match its signed entries), or --audit with a new log"
        )
    return AuditLog(log, key_path=key, follows=links_to(*follows))


def _record(log: AuditLog, event: str, *, as_json: bool = False, **details) -> None:
    """Append to the audit log; on a new log, say where its signing key is and what to record elsewhere."""
    from consortium.audit import key_fingerprint, load_public_key

    if log.append(event, **details)["index"] == 0:
        fingerprint = key_fingerprint(load_public_key(log.public_key_path))
        _notes(as_json).print(
            Text(
                f"new audit log {log.path}: signed with {log.key_path} (keep it private; never ship it). Record "
                f"its public key {log.public_key_path} or fingerprint {fingerprint} elsewhere, and verify "
                "against that copy"
            )
        )


def _operator_key(kits: Path) -> Path:
    from provisioning.kits import operator_folder

    return operator_folder(kits) / SIGNING_KEY_FILE


def _custodian_key(keys: Path) -> Path:
    from provisioning.he_keys import custodian_folder

    return custodian_folder(keys) / SIGNING_KEY_FILE


def provision_command(
    config: Path = _CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the kits, outside any git repository."),
    audit: Path | None = _AUDIT,
    signing_key: Path | None = _SIGNING_KEY,
    as_json: bool = _JSON,
) -> None:
    """Provision startup kits (server, one per member, one per admin) with site policies; no HE keys."""
    from consortium.audit import EVENT_PROVISIONED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    out = Path(out).resolve()
    log = _open_log(audit or out / AUDIT_FILE, signing_key or _operator_key(out), kits=out, as_json=as_json)
    with _notes(as_json).status("provisioning startup kits with NVFlare..."):
        result = kits.provision(consortium, out=out)
    _record(log, EVENT_PROVISIONED, as_json=as_json, config=str(consortium.source), **result.summary())
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
        f"Keep {result.out / kits.CA_STATE_DIR} and {log.key_path.parent} with the operator; never ship them."
    )


def add_member_command(
    config: Path = _CONFIG,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder written by 'consortium provision'."),
    member: str = typer.Option(..., "--member", help="The new member's name, already added to consortium.yaml."),
    audit: Path | None = _AUDIT,
    signing_key: Path | None = _SIGNING_KEY,
    as_json: bool = _JSON,
) -> None:
    """Add a member to existing kits, reusing the root CA; no other site's kit or HE key changes."""
    from consortium.audit import EVENT_MEMBER_ADDED
    from provisioning import kits
    from schema.config import load_config

    consortium = load_config(config)
    log = _open_log(
        audit or Path(kits_dir) / AUDIT_FILE, signing_key or _operator_key(kits_dir), kits=kits_dir, as_json=as_json
    )
    result = kits.add_member(consortium, kits=kits_dir, member=member)
    _record(log, EVENT_MEMBER_ADDED, as_json=as_json, member=member, **result.summary())
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
    kits_dir: Path | None = typer.Option(
        None, "--kits", help="The kits folder, if already received: the key log then follows its audit log."
    ),
    audit: Path | None = _AUDIT,
    signing_key: Path | None = _SIGNING_KEY,
    as_json: bool = _JSON,
) -> None:
    """Create the consortium's CKKS key pair: a secret context for members, a public one for the server."""
    from consortium.audit import EVENT_KEYS_CREATED
    from provisioning import he_keys, kits
    from schema.config import load_config

    consortium = load_config(config)
    kits.refuse_inside_git(Path(out).resolve(), what="HE keys")
    log = _open_log(
        audit or Path(out) / AUDIT_FILE,
        signing_key or _custodian_key(out),
        kits=kits_dir,
        follows=(kits_dir,),
        as_json=as_json,
    )
    with _notes(as_json).status("creating the CKKS key pair..."):
        keyset = he_keys.create_keys(consortium.privacy.he, out=out)
    _record(
        log,
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
    signing_key: Path | None = _SIGNING_KEY,
    as_json: bool = _JSON,
) -> None:
    """Install the secret context into member kits and the public context into the server kit.

    Recorded in the custodian's log (default ``<keys>/audit.jsonl``), whose entry follows the kits' log.
    """
    from consortium.audit import EVENT_KEYS_INSTALLED
    from provisioning import he_keys
    from schema.config import load_config

    consortium = load_config(config)
    log = _open_log(
        audit or Path(keys) / AUDIT_FILE,
        signing_key or _custodian_key(keys),
        kits=kits_dir,
        follows=(kits_dir,),
        as_json=as_json,
    )
    installed = he_keys.install_keys(kits_dir, keys, config=consortium, members=member or None)
    report = he_keys.verify_keys(kits_dir, config=consortium)
    fingerprint = he_keys.public_fingerprint(he_keys.load_context(Path(keys) / he_keys.SERVER_CONTEXT))
    _record(
        log,
        EVENT_KEYS_INSTALLED,
        as_json=as_json,
        fingerprint=fingerprint,
        kits=str(Path(kits_dir).resolve()),
        sites=[p.parent.parent.name for p in installed],
        files=[str(p) for p in installed],
        verified=report.ok,
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
    audit: Path | None = typer.Option(
        None, "--audit", help="Audit log to record the check in (default: the kits' log, if you hold its key)."
    ),
    signing_key: Path | None = typer.Option(
        None, "--signing-key", help="Your audit signing key for --audit (default: the operator's, if present)."
    ),
    as_json: bool = _JSON,
) -> None:
    """Prove the server kit holds no secret key and every site shares one key pair (exit 1 otherwise).

    Every file of the server kit (and of --workspace) is parsed as a TenSEAL context, whatever its name.
    The check is recorded in the kits' log when the operator's signing key is at hand (the operator runs
    it), or in ``--audit LOG`` with ``--signing-key``; anyone else's check is not recorded, and says so.
    """
    from consortium.audit import EVENT_KEYS_VERIFIED
    from provisioning import he_keys
    from schema.config import load_config

    consortium = load_config(config)
    report = he_keys.verify_keys(
        kits_dir, config=consortium, sites=site or None, fingerprint=fingerprint, workspace=workspace
    )
    kits_log = Path(kits_dir) / AUDIT_FILE
    key = signing_key or _operator_key(kits_dir)
    if signing_key is None and not key.exists():
        _notes(as_json).print(
            Text(
                f"not recorded: the operator's signing key for {kits_log} is not at {key}; to record this check "
                "in a log of your own, pass --audit LOG --signing-key KEY"
            )
        )
    else:
        log_path = Path(audit or kits_log)
        follows = (kits_dir,) if log_path.resolve() != kits_log.resolve() else ()
        log = _open_log(log_path, key, kits=kits_dir, follows=follows, as_json=as_json)
        _record(
            log,
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
