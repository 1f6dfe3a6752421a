"""``consortium stats``: the exact federated association statistics alone, without training.

One FLARE job (one round, or one per Newton step of a Cox model of covariates and one more): each member
sends its endpoints' pieces (encrypted under HE), the server adds them, a member's custodian opens the sum.
The result equals the pooled analysis with member as a factor (limma, or the stratified Cox score test).
NVFlare, torch and statsmodels are imported inside the command, so the CLI starts without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from consortium.commands.run import RunFailed, check_members, console_output_to
from consortium.console import Console
from consortium.report_markdown import DIRECTIONS, feature_label
from consortium.run_options import RunOptions

console = Console()
err_console = Console(stderr=True)
SHOWN = 10


def execute(config_path: Path, options: RunOptions, *, as_json: bool = False):
    from consortium.flare_env import FederatedRunError
    from consortium.run_folder import empty_run_folder
    from consortium.run_plan import RunPlan
    from consortium.statistics_run import run_statistics
    from schema.config import load_config

    options.check()
    plan = RunPlan.build(load_config(config_path), options, command="stats")  # before anything is written
    check_members(plan.config, as_json=as_json)  # before FLARE starts
    log_path = plan.out / "console.log"
    say = err_console if as_json else console
    if plan.force:  # now, before the console log of this run is opened in it
        say_line = lambda line: say.print(line, markup=False, highlight=False)  # noqa: E731
        empty_run_folder(plan.out, inputs=plan.inputs(), say=say_line)
    say.print(f"FLARE's own output goes to {log_path}")
    with console_output_to(log_path, terminal_fd=2 if as_json else 1) as terminal:
        status = Console(file=terminal)
        try:
            return run_statistics(plan, status=lambda line: status.print(line, markup=False, style="dim"))
        except FederatedRunError as exc:
            raise RunFailed(str(exc)) from None


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def print_statistics(result) -> None:
    from omics.statistics import ADJ_P, EFFECT, P_VALUE, STATISTIC

    for name, entry in result.statistics["endpoints"].items():
        effect, statistic = EFFECT[entry["type"]], STATISTIC[entry["type"]]
        notes = []
        if entry["withheld_min_members"]:
            notes.append(f"{entry['withheld_min_members']} withheld (< {entry['design']['min_members']} members)")
        if entry["small_cell"]:
            notes.append(f"below the small-cell rule, sent nothing: {', '.join(entry['small_cell'])}")
        console.print(
            f"{name} ({entry['type']}; members {', '.join(entry['members'])}): {entry['features_tested']} features "
            f"tested, {entry['significant_adj_p05']} with adj.P.Val < 0.05" + "".join(f"; {n}" for n in notes),
            markup=False,
            highlight=False,
        )
        higher, lower = DIRECTIONS[entry["type"]]
        for title, rows in ((higher, entry["markers"]), (lower, entry["markers_down"])):
            if rows:
                console.print(f"  {title}:", markup=False, highlight=False)
            for row in rows[:SHOWN]:  # 80 columns: gene symbol (else id), t (or z), effect, P.Value, adj.P.Val
                label = "z" if statistic == "statistic" else statistic
                console.print(
                    f"    {feature_label(row):<18} {label} {_fmt(row[statistic], '7.2f')}  {effect} "
                    f"{_fmt(row[effect], '7.3f')}  P {_fmt(row[P_VALUE], '.1e')}  adj.P {_fmt(row[ADJ_P], '.1e')}",
                    markup=False,
                    highlight=False,
                )
    tables = ", ".join(str(p) for p in result.tables)
    console.print(f"statistics: {result.path}\ntables: {tables}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        env: str = typer.Option("sim", "--env", help="'sim' (FLARE simulator) or 'poc' (real FLARE processes)."),
        out: Path = typer.Option(..., "--out", help="Folder for statistics.json, the CSV tables and the logs."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: privacy.he.enabled)."),
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr."
        ),
        force: bool = typer.Option(
            False, "--force", help="Empty --out first when it holds an earlier run (a folder holds one run)."
        ),
    ) -> None:
        """Exact federated association statistics per endpoint and feature (no training): limma's moderated t
        with the declared design and member as a factor (binary, regression), the Cox score test given the
        covariates stratified by member (survival); BH adj.P.Val."""
        result = execute(config, RunOptions(out=out, env=env, he=he, force=force), as_json=as_json)
        if as_json:
            document = {
                "statistics_path": str(result.path),
                "tables": [str(p) for p in result.tables],
                "job_id": result.job_id,
                "statistics": result.statistics,
            }
            typer.echo(json.dumps(document, indent=2))
        else:
            print_statistics(result)
