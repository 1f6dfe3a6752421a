"""``consortium audit verify LOG``: check the chain and signatures of an audit log (exit 0 intact, 1 broken)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from consortium.console import Console

if TYPE_CHECKING:
    from consortium.audit import AuditReport

console = Console()

audit_app = typer.Typer(help="The consortium's hash-chained, signed audit log.")


@audit_app.command("verify")
def audit_verify(
    log: Path = typer.Argument(..., help="The audit.jsonl to check."),
    expected_head: str | None = typer.Option(
        None,
        "--expected-head",
        help="A head hash recorded elsewhere earlier; catches a cut or replaced tail.",
    ),
    public_key: Path | None = typer.Option(
        None,
        "--public-key",
        help="A copy of the log's <log>.pub kept elsewhere; catches a log re-signed with another key.",
    ),
    expected_key_fingerprint: str | None = typer.Option(
        None,
        "--expected-key-fingerprint",
        help="The sha256 fingerprint of the log's public key, recorded elsewhere (instead of --public-key).",
    ),
    audit: Path | None = typer.Option(
        None, "--audit", help="Log to record a successful check in (default: LOG itself; never a broken log)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Verify that no entry was edited, forged, deleted, inserted or reordered, and that the tail is complete."""
    from consortium.audit import load_public_key, verify_log

    key = load_public_key(public_key) if public_key is not None else None
    report = verify_log(log, expected_head=expected_head, public_key=key, expected_fingerprint=expected_key_fingerprint)
    if as_json:
        not_recorded = _record(report, log, audit) if report.ok else None
        typer.echo(json.dumps(_as_dict(report, not_recorded=not_recorded), indent=2))
        report.raise_for_failure()
        return
    if not report.ok:
        table = Table("first bad entry", "why", title=Text(f"audit log {log}: BROKEN"))
        table.add_row("-" if report.first_bad is None else str(report.first_bad), Text(report.reason))
        console.print(table)
        report.raise_for_failure()
    table = Table("event", "entries", title=Text(f"audit log {log}: intact"))
    for event, count in sorted(report.events.items()):
        table.add_row(Text(event), str(count))
    console.print(table)
    console.print(f"[green]ok[/]: {report.entries} entries, head hash [bold]{report.head_hash}[/]")
    console.print(f"signing key fingerprint [bold]{report.key_fingerprint}[/] (from {escape(report.key_source)})")
    if not report.independent_key:
        console.print(
            "[yellow]note[/]: the key was read next to the log; to rule out a log re-signed with another key, "
            "pass --public-key or --expected-key-fingerprint with a copy kept elsewhere",
            highlight=False,
        )
    not_recorded = _record(report, log, audit)
    if not_recorded:
        console.print(Text(not_recorded))


def _record(report: AuditReport, log: Path, audit: Path | None) -> str | None:
    """Record a passed check; a verifier who is not the log's writer cannot sign into it (the check itself
    still passed): returns why it was not recorded, or None."""
    from consortium.audit import EVENT_AUDIT_VERIFIED, AuditError, AuditLog

    try:
        AuditLog(audit if audit is not None else log).append(
            EVENT_AUDIT_VERIFIED,
            log=str(Path(log).resolve()),
            entries=report.entries,
            head_hash=report.head_hash,
            key_fingerprint=report.key_fingerprint,
        )
    except AuditError as exc:
        return f"not recorded: {exc}; pass --audit LOG to record the check in a log you write"
    return None


def _as_dict(report: AuditReport, *, not_recorded: str | None) -> dict:
    result = {
        "log": str(report.path),
        "ok": report.ok,
        "entries": report.entries,
        "head_hash": report.head_hash,
        "events": dict(sorted(report.events.items())),
        "key_fingerprint": report.key_fingerprint,
        "key_source": report.key_source,
        "independent_key": report.independent_key,
    }
    if report.ok:
        result["recorded"] = not_recorded is None
        if not_recorded:
            result["not_recorded_because"] = not_recorded
    else:
        result.update(first_bad=report.first_bad, reason=report.reason)
    return result


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
