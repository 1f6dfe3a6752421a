"""``consortium audit verify LOG``: check the hash chain of an audit log (exit 0 intact, 1 broken)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from consortium.audit import EVENT_AUDIT_VERIFIED, AuditLog, verify_log

console = Console()

audit_app = typer.Typer(help="The consortium's hash-chained audit log.")


@audit_app.command("verify")
def audit_verify(
    log: Path = typer.Argument(..., help="The audit.jsonl to check.", dir_okay=False),
    expected_head: str | None = typer.Option(
        None,
        "--expected-head",
        help="A head hash recorded elsewhere earlier; catches a cut or replaced tail.",
    ),
    audit: Path | None = typer.Option(
        None, "--audit", help="Log to record a successful check in (default: LOG itself; never a broken log)."
    ),
) -> None:
    """Verify that no entry was edited, deleted, inserted or reordered, and that the tail is complete."""
    report = verify_log(log, expected_head=expected_head)
    if not report.ok:
        table = Table("first bad entry", "why", title=f"audit log {log}: BROKEN")
        table.add_row("-" if report.first_bad is None else str(report.first_bad), report.reason)
        console.print(table)
        report.raise_for_failure()
    table = Table("event", "entries", title=f"audit log {log}: intact")
    for event, count in sorted(report.events.items()):
        table.add_row(event, str(count))
    console.print(table)
    console.print(f"[green]ok[/]: {report.entries} entries, head hash [bold]{report.head_hash}[/]")
    AuditLog(audit if audit is not None else log).append(
        EVENT_AUDIT_VERIFIED, log=str(Path(log).resolve()), entries=report.entries, head_hash=report.head_hash
    )


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
