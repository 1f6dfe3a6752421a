"""``consortium keys create|install|verify``: the HE key ceremony, run by a member's key custodian;
``consortium keys masks``: each member's mask key for secure aggregation, made in its own kit.

The custodian runs it on its own machine (the operator must never see ``client_context.tenseal``) and
records each step in its own audit log, ``<keys>/audit.jsonl``, signed with ``<keys>.custodian/audit.key``.
Mask keys (:mod:`provisioning.mask_keys`) are made by each member in its own kit; ``keys verify`` checks
them too where the consortium uses secure aggregation, and records their fingerprints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from consortium.commands.signed_log import (
    AUDIT_FILE,
    AUDIT_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    SIGNING_KEY_OPTION,
    console,
    custodian_key,
    echo_json,
    notes,
    open_log,
    operator_key,
    record,
)
from schema.errors import UserError

if TYPE_CHECKING:
    from provisioning.he_keys import KeyReport
    from provisioning.mask_keys import Ceremony, MaskReport

keys_app = typer.Typer(
    help="The HE key ceremony, run by a member's key custodian (never the operator); each member's mask key."
)


@keys_app.command("create")
def keys_create(
    config: Path = CONFIG_OPTION,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the key pair, outside any git repository."),
    kits_dir: Path | None = typer.Option(
        None, "--kits", help="The kits folder, if already received: the key log then follows its audit log."
    ),
    audit: Path | None = AUDIT_OPTION,
    signing_key: Path | None = SIGNING_KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create the consortium's CKKS key pair: a secret context for members, a public one for the server."""
    from consortium.audit import EVENT_KEYS_CREATED
    from provisioning import he_keys, kits
    from schema.config import load_config

    consortium = load_config(config)
    kits.refuse_inside_git(Path(out).resolve(), what="HE keys")
    log = open_log(
        audit or Path(out) / AUDIT_FILE,
        signing_key or custodian_key(out),
        kits=kits_dir,
        follows=(kits_dir,),
        as_json=as_json,
    )
    with notes(as_json).status("creating the CKKS key pair..."):
        keyset = he_keys.create_keys(consortium.privacy.he, out=out)
    record(
        log,
        EVENT_KEYS_CREATED,
        as_json=as_json,
        fingerprint=keyset.fingerprint,
        keys=str(Path(out).resolve()),
        **_he_params(consortium),
    )
    if as_json:
        echo_json(
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
    config: Path = CONFIG_OPTION,
    kits_dir: Path = typer.Option(..., "--kits", help="The kits folder written by 'consortium provision'."),
    keys: Path = typer.Option(..., "--keys", help="The folder written by 'consortium keys create'."),
    member: list[str] | None = typer.Option(
        None, "--member", help="Install only into this member's kit (repeatable), e.g. after add-member."
    ),
    audit: Path | None = AUDIT_OPTION,
    signing_key: Path | None = SIGNING_KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Install the secret context into member kits and the public context into the server kit.

    Recorded in the custodian's log (default ``<keys>/audit.jsonl``), whose entry follows the kits' log.
    """
    from consortium.audit import EVENT_KEYS_INSTALLED
    from provisioning import he_keys
    from schema.config import load_config

    consortium = load_config(config)
    log = open_log(
        audit or Path(keys) / AUDIT_FILE,
        signing_key or custodian_key(keys),
        kits=kits_dir,
        follows=(kits_dir,),
        as_json=as_json,
    )
    installed = he_keys.install_keys(kits_dir, keys, config=consortium, members=member or None)
    report = he_keys.verify_keys(kits_dir, config=consortium)
    fingerprint = he_keys.public_fingerprint(he_keys.load_context(Path(keys) / he_keys.SERVER_CONTEXT))
    record(
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
        echo_json({"installed": [str(p) for p in installed], "verification": _key_report_dict(report)})
        report.raise_for_failure()
        return
    for path in installed:
        console.print(f"installed {path}")
    _print_report(report)
    report.raise_for_failure()


@keys_app.command("verify")
def keys_verify(
    config: Path = CONFIG_OPTION,
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
    as_json: bool = JSON_OPTION,
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
    masks = None
    if consortium.secure_aggregation():
        from provisioning.mask_keys import verify_masks

        masks = verify_masks(kits_dir, config=consortium, sites=site or None, workspace=workspace)
    kits_log = Path(kits_dir) / AUDIT_FILE
    key = signing_key or operator_key(kits_dir)
    if signing_key is None and not key.exists():
        notes(as_json).print(
            Text(
                f"not recorded: the operator's signing key for {kits_log} is not at {key}; to record this check "
                "in a log of your own, pass --audit LOG --signing-key KEY"
            )
        )
    else:
        log_path = Path(audit or kits_log)
        follows = (kits_dir,) if log_path.resolve() != kits_log.resolve() else ()
        log = open_log(log_path, key, kits=kits_dir, follows=follows, as_json=as_json)
        mask_details = {} if masks is None else {"masks_ok": masks.ok, "mask_fingerprints": masks.fingerprints}
        record(
            log,
            EVENT_KEYS_VERIFIED,
            as_json=as_json,
            ok=report.ok and (masks is None or masks.ok),
            fingerprint=report.fingerprint,
            scanned=report.scanned,
            findings=[f"{f.path}: {f.problem}" for f in [*report.findings, *(masks.findings if masks else [])]],
            **mask_details,
        )
    if as_json:
        echo_json({**_key_report_dict(report), **({"masks": _mask_report_dict(masks)} if masks else {})})
    else:
        _print_report(report)
        if masks is not None:
            _print_mask_report(masks)
    report.raise_for_failure()
    if masks is not None:
        masks.raise_for_failure()


@keys_app.command("masks")
def keys_masks(
    config: Path = CONFIG_OPTION,
    kit: Path | None = typer.Option(
        None, "--kit", help="Your member kit (KITS/<member>): its mask key is made there and never leaves it."
    ),
    kits_dir: Path | None = typer.Option(
        None,
        "--kits",
        help="A folder holding every member kit: each gets a key and the list (one machine only: POC, tests, demos).",
    ),
    public: Path | None = typer.Option(
        None,
        "--public",
        help="Folder of the members' public key files (<member>.maskpub.json): yours is written there, and the "
        "list is installed once it holds every member's. Default with --kit: the kit's parent folder.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a member's mask key (secure aggregation) in its own kit and install every member's public key.

    Each member runs it on its own machine: ``--kit KITS/<member> --public DIR`` makes the private key in
    ``startup/`` (it never leaves the kit) and writes DIR/<member>.maskpub.json to hand on; once DIR holds
    every member's file, the same command installs the list into the kit. Compare the printed fingerprints
    with the other members' over a second channel.
    """
    from provisioning import mask_keys
    from schema.config import load_config

    if (kit is None) == (kits_dir is None):
        raise UserError(
            "give --kit KITS/<member> (your own member kit) or --kits KITS (every member kit on one machine), "
            "not both or neither"
        )
    consortium = load_config(config)
    if not consortium.secure_aggregation():
        notes(as_json).print(
            Text(
                f"note: {consortium.source} does not use secure aggregation (privacy.secure_aggregation); jobs "
                "will not read these keys"
            )
        )
    if kits_dir is not None:
        ceremony = mask_keys.ceremony_on_one_machine(kits_dir, config=consortium, public_dir=public)
    else:
        public = public if public is not None else Path(kit).resolve().parent
        ceremony = mask_keys.member_ceremony(kit, config=consortium, public_dir=public)
    if as_json:
        echo_json(
            {
                "keys": [
                    {
                        "member": key.member,
                        "private_key": str(key.private_key),
                        "created": key.created,
                        "public_file": str(key.public_file) if key.public_file else None,
                        "fingerprint": key.fingerprint,
                    }
                    for key in ceremony.keys
                ],
                "installed": [str(path) for path in ceremony.installed],
                "fingerprints": ceremony.fingerprints,
                "missing": ceremony.missing,
            }
        )
        return
    _print_ceremony(ceremony, public)


def _print_ceremony(ceremony: Ceremony, public: Path | None) -> None:
    for key in ceremony.keys:
        how = "made" if key.created else "kept (already there)"
        console.print(Text(f"{key.member}: private mask key {how}: {key.private_key} (never leaves this kit)"))
        if key.public_file is not None:
            console.print(Text(f"{key.member}: public key file {key.public_file} (hand it on to every member)"))
    table = Table("member", "public mask key fingerprint (sha256)", title="mask public keys")
    for member, value in ceremony.fingerprints.items():
        table.add_row(Text(member), value)
    console.print(table)
    for path in ceremony.installed:
        console.print(Text(f"installed {path}"))
    if ceremony.missing:
        console.print(
            Text(
                f"not installed yet: no public key file in {public} for {', '.join(ceremony.missing)}. Once every "
                "member's <member>.maskpub.json is there, run this command again to install the list"
            )
        )


def _mask_report_dict(report: MaskReport) -> dict:
    return {
        "ok": report.ok,
        "fingerprints": dict(report.fingerprints),
        "checked": list(report.checked),
        "scanned": report.scanned,
        "findings": [{"path": str(f.path), "problem": f.problem} for f in report.findings],
    }


def _print_mask_report(report: MaskReport) -> None:
    if report.ok:
        table = Table("member", "public mask key fingerprint (sha256)", title="mask keys")
        for member, value in report.fingerprints.items():
            table.add_row(Text(member), value)
        console.print(table)
        console.print(
            f"[green]ok[/]: every member kit checked holds its own mask key and the same list "
            f"({len(report.checked)} kits); {report.scanned} server files searched, no member's mask key"
        )
        return
    _print_findings(report.findings, title="mask key verification: findings")


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
    _print_findings(report.findings, title="HE key verification: findings")


def _print_findings(findings: list, *, title: str) -> None:
    table = Table("file", "problem", title=title, show_lines=True)
    for finding in findings:
        table.add_row(Text(str(finding.path)), Text(finding.problem))
    console.print(table)


def _he_params(consortium) -> dict:
    he = consortium.privacy.he
    return {
        "poly_modulus_degree": he.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(he.coeff_mod_bit_sizes),
        "global_scale_bits": he.global_scale_bits,
    }
