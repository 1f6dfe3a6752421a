"""``consortium data check`` and ``consortium data split``: a member's data against the contract."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from omics.contract import ContractReport, ContractRules, check_member
from omics.errors import DataFileError
from omics.io import read_member, write_member
from omics.split import assign_split
from schema import settings
from schema.config import load_config
from schema.errors import UserError

console = Console()
data_app = typer.Typer(help="Check and prepare a member's omics data.", no_args_is_help=True)


def check_member_file(config_path: Path, member_name: str) -> ContractReport:
    """The contract report of one member's file; an unreadable file is a report with one error."""
    config = load_config(config_path)
    member = config.member(member_name)
    rules = ContractRules(**settings.contract_rules(config))
    try:
        adata = read_member(member.data)
    except DataFileError as exc:
        report = ContractReport(path=str(member.data))
        report.error(
            "file",
            str(exc),
            "point the member's 'data' in consortium.yaml at its .h5ad file, or re-export it with "
            "anndata's adata.write_h5ad(path)",
        )
        return report
    return check_member(adata, tasks=member.tasks, rules=rules, path=member.data)


@data_app.command("check")
def check(
    config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
    member: str = typer.Option(..., "--member", help="The member whose data to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a member's data against the consortium contract (exit 0 fit, 1 not fit, 2 usage error)."""
    report = check_member_file(config, member)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, member)
    raise typer.Exit(0 if report.fit else 1)


@data_app.command("split")
def split(
    config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
    member: str = typer.Option(..., "--member", help="The member whose data to split."),
    force: bool = typer.Option(False, "--force", help="Replace a split already stored in the file."),
) -> None:
    """Store a stratified, seeded train/val/test split in the member's file (obs['split'])."""
    cfg = load_config(config)
    entry = cfg.member(member)
    try:
        adata = read_member(entry.data)
    except DataFileError as exc:
        raise UserError(f"{exc} (member '{member}' in {cfg.source})") from None
    if "split" in adata.obs.columns and not force:
        console.print(Text(f"{entry.data} already holds a split; pass --force to replace it"))
        raise typer.Exit(1)
    assign_split(
        adata,
        tasks=entry.tasks,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.data.split_seed,
    )
    try:
        write_member(adata, entry.data)
    except OSError as exc:
        raise UserError(
            f"{entry.data}: cannot store the split ({exc.strerror}); make the file and its folder writable"
        ) from None
    console.print(Text(f"stored split in {entry.data}: {dict(adata.obs['split'].value_counts())}"))


def _print_report(report: ContractReport, member: str) -> None:
    verdict = "[green]fit to join[/]" if report.fit else "[red]NOT fit to join[/]"
    console.print(
        f"[bold]{escape(member)}[/] ({escape(report.path)}): {report.n_samples} samples x {report.n_features} "
        f"features, panel coverage {report.coverage:.1%}: {verdict}",
        highlight=False,
    )
    if report.tasks:
        tasks = Table(title="tasks", show_edge=False)
        for column in ("task", "type", "labelled", "classes / events"):
            tasks.add_column(column)
        for name, info in report.tasks.items():
            detail = (
                f"{info['positives']} pos / {info['negatives']} neg"
                if info["type"] == "binary"
                else f"{info['events']} events"
                if info["type"] == "survival"
                else ""
            )
            tasks.add_row(Text(name), info["type"], str(info["labeled"]), detail)
        console.print(tasks)
    if report.findings:
        table = Table(title="findings", show_lines=True)
        for column in ("level", "field", "problem", "fix"):
            table.add_column(column, overflow="fold")
        for f in report.findings:
            level = Text("error", style="red") if f.level == "error" else Text("warning", style="yellow")
            table.add_row(level, Text(f.field), Text(f.message), Text(f.fix))
        console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
