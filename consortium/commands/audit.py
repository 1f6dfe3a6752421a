"""``consortium audit verify LOG``: check the chain and signatures of an audit log (exit 0 intact, 1 broken).

It only reads: no byte of the log, its head, its key files or its folder changes, and no key is made, so
an auditor holding copies of the logs and their public keys runs it as well as their writers do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from consortium.console import Console

if TYPE_CHECKING:
    from consortium.audit import AuditReport
    from consortium.audit.chain import ChainReport

console = Console()

audit_app = typer.Typer(help="The consortium's hash-chained, signed audit logs.")


@audit_app.command("verify")
def audit_verify(
    log: Path = typer.Argument(..., help="The audit.jsonl to check (with --follow: the newest, e.g. a release's)."),
    expected_head: str | None = typer.Option(
        None,
        "--expected-head",
        help="A head hash recorded elsewhere earlier; catches a cut or replaced tail.",
    ),
    public_key: Path | None = typer.Option(
        None,
        "--public-key",
        help="A copy of the log's <log>.pub kept elsewhere: proves who wrote the log, not only that it is intact.",
    ),
    expected_key_fingerprint: str | None = typer.Option(
        None,
        "--expected-key-fingerprint",
        help="The sha256 fingerprint of the log's public key, recorded elsewhere (instead of --public-key).",
    ),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="Also verify every log this one follows (their recorded heads and keys), back to provisioning.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Verify that no entry was edited, forged, deleted, inserted or reordered, and that the tail is complete.

    Reads only. With --public-key or --expected-key-fingerprint the check is complete: the log is intact and
    was written by that key. Without, the key beside the log is trusted: that proves integrity, not authorship.
    """
    from consortium.audit import load_public_key, verify_log
    from consortium.audit.chain import verify_chain

    key = load_public_key(public_key) if public_key is not None else None
    given = {"expected_head": expected_head, "public_key": key, "expected_fingerprint": expected_key_fingerprint}
    chain = verify_chain(log, **given) if follow else None
    report = chain.logs[-1] if chain is not None else verify_log(log, **given)  # the log given comes last
    outcome = chain if chain is not None else report
    if as_json:
        typer.echo(json.dumps(_as_dict(report, chain), indent=2))
        outcome.raise_for_failure()
        return
    if chain is not None:
        _print_chain(chain)
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
    console.print(Text(_trust_line(report)))
    outcome.raise_for_failure()
    if chain is not None:
        console.print(f"[green]chain ok[/]: {len(chain.logs)} logs, {len(chain.links)} links checked")


def _trust_line(report: AuditReport) -> str:
    if report.independent_key:
        return (
            f"signing key fingerprint {report.key_fingerprint}, checked against the key given: the log is intact "
            "and was written by that key"
        )
    return (
        f"trusted the key beside the log ({report.key_source}), fingerprint {report.key_fingerprint}: this proves "
        "the log's integrity, not who wrote it (whoever could replace the log could replace that key too); pass "
        "--public-key or --expected-key-fingerprint with a copy kept elsewhere to prove authorship"
    )


def _print_chain(chain: ChainReport) -> None:
    table = Table("log", "entries", "writer key", "checked against", "result", title="audit chain", show_lines=True)
    for report in chain.logs:
        result = "[green]intact[/]" if report.ok else f"[red]BROKEN[/] at entry {report.first_bad}: {report.reason}"
        fingerprint = (report.key_fingerprint or "-")[:16]
        trusted = chain.trusted.get(report.path.resolve(), "")
        table.add_row(Text(str(report.path)), str(report.entries), fingerprint, Text(trusted), result)
    console.print(table)
    for link in chain.links:
        where = f"{link.follower} entry {link.entry} -> {link.found or link.recorded}"
        if link.ok:
            console.print(Text(f"link ok: {where}"), highlight=False)
        else:
            console.print(Text(f"link BROKEN: {where}: {link.reason}"), highlight=False)


def _as_dict(report: AuditReport, chain: ChainReport | None) -> dict:
    result = _log_dict(report)
    if chain is not None:
        result["ok"] = chain.ok
        result["chain"] = [{**_log_dict(r), "checked_against": chain.trusted.get(r.path.resolve())} for r in chain.logs]
        result["links"] = [
            {
                "follower": str(link.follower),
                "entry": link.entry,
                "log": link.recorded,
                "found": None if link.found is None else str(link.found),
                "ok": link.ok,
                **({} if link.ok else {"reason": link.reason}),
            }
            for link in chain.links
        ]
    return result


def _log_dict(report: AuditReport) -> dict:
    result = {
        "log": str(report.path),
        "ok": report.ok,
        "entries": report.entries,
        "head_hash": report.head_hash,
        "events": dict(sorted(report.events.items())),
        "key_fingerprint": report.key_fingerprint,
        "key_source": report.key_source,
        "independent_key": report.independent_key,
        "proves": report.proves,
    }
    if not report.ok:
        result.update(first_bad=report.first_bad, reason=report.reason)
    return result


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
