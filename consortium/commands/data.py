"""``consortium data check`` and ``consortium data split``: a member's data against the contract.

The data libraries (anndata, pandas) are imported inside the commands, so the CLI starts without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from consortium.console import Console
from schema.errors import UserError

if TYPE_CHECKING:
    from omics.contract import ContractReport
    from schema.config import ConsortiumConfig

console = Console()
MIN_TEST_CASES = 15
"""Below this many test cases of an endpoint's scarcest kind (the smaller class, events, labelled samples),
its test figures rest on too few samples to tell arms apart: the commands suggest cross-validation."""
data_app = typer.Typer(help="Check and prepare a member's omics data.", no_args_is_help=True)


def check_member_data(
    config: ConsortiumConfig, member_name: str, *, design_blocks: dict | None = None
) -> ContractReport:
    """The contract report of one member of a loaded consortium (an unreadable file is a report with one
    error); with ``design_blocks`` (a dict), each endpoint's design block of this member is put in it
    (rank checks)."""
    from omics.chunked import chunked_read
    from omics.chunked_prepare import check_member_in_chunks, matrix_group
    from omics.contract import ContractReport, ContractRules, check_member
    from omics.errors import DataFileError
    from omics.io import read_member
    from omics.layout import MemberLayout
    from schema import settings

    member = config.member(member_name)
    rules = ContractRules(**settings.contract_rules(config))
    layout = MemberLayout(**settings.member_layout(config, member_name))
    try:
        chunks = member.sample_column is None and chunked_read(
            member.data, group=matrix_group(layout), read=member.read, member=member.name
        )
        if chunks:  # a matrix larger than memory: its values checked a block of rows at a time
            report, adata = check_member_in_chunks(member.data, tasks=member.tasks, rules=rules, layout=layout)
            report.layout["read"] = "in chunks"
        else:
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
    if not chunks:
        report = check_member(adata, tasks=member.tasks, rules=rules, layout=layout, path=member.data)
    if report.fit:
        blocks = check_statistics_design(report, adata, config=config, member_name=member_name)
        if design_blocks is not None:
            design_blocks.update(blocks)
    return report


def check_statistics_design(
    report: ContractReport, adata, *, config: ConsortiumConfig, member_name: str
) -> dict[str, object]:
    """Add to ``report`` what keeps the member's samples from entering the declared design (a covariate
    column missing, a level not declared, a missing value, a sample column that varies within a sample);
    returns each endpoint's design block of this member."""
    import numpy as np

    from omics.design import DesignSpec, design_matrix
    from omics.errors import ContractError, FieldError
    from omics.prepare import task_targets
    from schema import settings

    member = config.member(member_name)
    spec = DesignSpec(**settings.design_spec(config))
    blocks: dict[str, object] = {}
    try:
        if member.sample_column is not None:
            from jobs.member_data import statistics_samples

            samples = statistics_samples(config, member_name, adata=adata)  # the file read once
            obs, targets = samples.obs, samples.targets
        else:
            obs = adata.obs
            targets = {task.name: task_targets(obs, task) for task in member.tasks}
        for task in member.tasks:
            values = targets[task.name]
            rows = ~np.isnan(values.reshape(len(values), -1)).any(axis=1)
            endpoint = None if task.type == "survival" else values[rows]
            blocks[task.name] = design_matrix(
                obs[rows], endpoint, spec=spec, region=member.region, path=str(member.data)
            )
    except FieldError as exc:  # the design or the pseudobulk: field, problem and fix apart
        report.error(f"statistics ({exc.field})", exc.problem, exc.fix)
    except ContractError as exc:
        report.error("statistics", str(exc), "make the member's file fit the statistics settings named above")
    return blocks


@data_app.command("check")
def check(
    config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
    member: str = typer.Option(..., "--member", help="The member whose data to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a member's data against the consortium contract (exit 0 fit, 1 not fit, 2 usage error)."""
    from schema.config import load_config

    cfg = load_config(config)
    report = check_member_data(cfg, member)
    hint = None if cfg.data.folds else folds_hint(expected_test_cases(report, cfg.data.test_fraction), member=member)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "hints": [hint] if hint else []}, indent=2))
    else:
        print_report(report, member, omics=bool(cfg.panel_features()))
        if hint:
            console.print(Text(hint, style="yellow"))
    raise typer.Exit(0 if report.fit else 1)


@data_app.command("split")
def split(
    config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
    member: str = typer.Option(..., "--member", help="The member whose data to split."),
    force: bool = typer.Option(False, "--force", help="Replace a split already stored."),
    in_place: bool = typer.Option(
        False, "--in-place", help="Write the split into the member's .h5ad (obs['split']) instead of beside it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Store a stratified, seeded train/val/test split beside the member's file (<name>.split.csv).

    The member's .h5ad is not rewritten unless --in-place is given; every command reads the split
    stored beside it into obs['split'].
    """
    from omics.errors import DataFileError
    from omics.io import read_member, write_member
    from omics.split import assign_split, split_file, write_split_file
    from schema.config import load_config

    cfg = load_config(config)
    entry = cfg.member(member)
    try:
        adata = read_member(entry.data)
    except DataFileError as exc:
        raise UserError(f"{exc} (member '{member}' in {cfg.source})") from None
    beside = split_file(entry.data)
    if "split" in adata.obs.columns and not force:
        message = f"{beside if beside.is_file() else entry.data} already holds a split; pass --force to replace it"
        if as_json:
            typer.echo(json.dumps({"path": str(entry.data), "member": member, "stored": False, "reason": message}))
        else:
            console.print(Text(message))
        raise typer.Exit(1)
    assign_split(
        adata,
        tasks=entry.tasks,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.data.split_seed,
    )
    target = entry.data if in_place else beside
    try:
        if in_place:
            adata.uns.pop("split_file", None)
            write_member(adata, entry.data)
            beside.unlink(missing_ok=True)  # it would replace the split just written whenever the file is read
        else:
            write_split_file(adata, beside)
    except OSError as exc:
        raise UserError(
            f"{target}: cannot store the split ({exc.strerror}); make {target.parent} writable"
            + ("" if in_place else ", or pass --in-place to write it into the member's file")
        ) from None
    counts = {str(k): int(v) for k, v in adata.obs["split"].value_counts().items()}
    if as_json:
        result = {"path": str(target), "data": str(entry.data), "member": member, "stored": True, "split": counts}
        typer.echo(json.dumps(result, indent=2))
        return
    parts = ", ".join(f"{counts.get(part, 0)} {part}" for part in ("train", "val", "test"))
    console.print(Text(f"stored split in {target}: {parts} samples"))
    cases = split_test_cases(adata, entry.tasks)
    console.print(Text("test split: " + ", ".join(f"{task} {n} {kind}" for task, (n, kind) in cases.items())))
    hint = None if cfg.data.folds else folds_hint(cases, member=member)
    if hint:
        console.print(Text(hint, style="yellow"))


def split_test_cases(adata, tasks) -> dict[str, tuple[int, str]]:
    """Per task, the test split's count of the task's scarcest kind: ``(n, "positives"|"negatives"|"events"|
    "labelled")`` (binary: the smaller class)."""
    import numpy as np

    from omics.prepare import task_targets

    test = adata.obs["split"].astype(str).to_numpy() == "test"
    cases: dict[str, tuple[int, str]] = {}
    for task in tasks:
        values = task_targets(adata.obs, task)[test]
        if task.type == "survival":
            cases[task.name] = (int(np.nansum(values[:, 1] == 1)), "events")
        elif task.type == "binary":
            pos, neg = int((values == 1).sum()), int((values == 0).sum())
            cases[task.name] = (pos, "positives") if pos <= neg else (neg, "negatives")
        else:
            cases[task.name] = (int((~np.isnan(values)).sum()), "labelled")
    return cases


def expected_test_cases(report: ContractReport, test_fraction: float) -> dict[str, tuple[int, str]]:
    """Per task of a data check, about how many of its scarcest kind a test split of ``test_fraction`` holds."""
    cases: dict[str, tuple[int, str]] = {}
    for name, info in report.tasks.items():
        if info["type"] == "binary":
            n, kind = min((info["positives"], "positives"), (info["negatives"], "negatives"))
        elif info["type"] == "survival":
            n, kind = info["events"], "events"
        else:
            n, kind = info["labeled"], "labelled"
        cases[name] = (round(n * test_fraction), kind)
    return cases


def folds_hint(test_cases: dict[str, tuple[int, str]], *, member: str) -> str | None:
    """One line suggesting cross-validation when a task's test split holds fewer than :data:`MIN_TEST_CASES`
    of its scarcest kind (``test_cases`` as from :func:`split_test_cases`), else ``None``. The run console
    may print it too, from the same counts."""
    few = {task: case for task, case in test_cases.items() if case[0] < MIN_TEST_CASES}
    if not few:
        return None
    shown = ", ".join(f"{n} {kind} of '{task}'" for task, (n, kind) in few.items())
    return (
        f"hint: the test split of member '{member}' holds about {shown}: its test figures will have wide "
        "intervals; run with '--folds 5' (or set data.folds: 5) so every sample is tested once"
    )


def print_report(report: ContractReport, member: str, *, omics: bool = True) -> None:
    """The contract report of ``member``'s file; ``omics`` False: the consortium has no omics panel
    (clinical inputs only), so the file's features and coverage are not part of the check."""
    verdict = "[green]fit to join[/]" if report.fit else "[red]NOT fit to join[/]"
    measured = (
        f" x {report.n_features} features, panel coverage {report.coverage:.1%}"
        if omics
        else ", clinical inputs only (no omics panel)"
    )
    console.print(
        f"[bold]{escape(member)}[/] ({escape(report.path)}): {report.n_samples} samples{measured}: {verdict}",
        highlight=False,
    )
    if report.layout:
        console.print(Text(_layout_line(report.layout)))
    if report.clinical:
        console.print(Text(f"clinical inputs (panel.clinical): {', '.join(report.clinical)}"))
    if report.tasks:
        tasks = Table(title="tasks", show_edge=False)
        for column in ("task", "type", "labelled", "classes / events"):
            tasks.add_column(column)
        for name, info in report.tasks.items():
            detail = (
                f"{info['positives']} pos / {info['negatives']} neg"
                + (f" (positive: {info['positive']!r})" if "positive" in info else "")
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


def _layout_line(layout: dict) -> str:
    chunks = " a block of rows at a time" if layout.get("read") == "in chunks" else ""
    line = f"read {layout.get('matrix', 'X')}{chunks}, identifiers from {layout.get('identifiers', 'var_names')}"
    if layout.get("versions_stripped"):
        line += f" ({layout['versions_stripped']} Ensembl version suffixes stripped)"
    if layout.get("symbols"):
        line += f", symbols from {layout['symbols']}"
    return line


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
