"""``consortium feasibility``: a protocol's eligibility counts across the members, without training.

One FLARE round: each member counts the protocol's criteria on its own obs and sends the count vector
(encrypted under HE), the server adds them, a member's custodian opens the sum, and the release rules
(small cells as ``<k``, complementary suppression, optional Laplace noise) decide what is shown. The
protocol is parsed, never evaluated, and checked against the config and the members' obs before
anything runs (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from consortium.commands.run import RunFailed, check_members, console_output_to
from consortium.console import Console
from consortium.run_options import RunOptions

console = Console()
err_console = Console(stderr=True)


def execute(config_path: Path, protocol_path: Path, options: RunOptions, *, as_json: bool = False):
    from consortium.feasibility_output import write_plots, write_report
    from consortium.feasibility_run import check_protocol, run_feasibility
    from consortium.flare_env import FederatedRunError
    from consortium.run_folder import empty_run_folder
    from consortium.run_plan import RunPlan
    from schema.config import load_config

    options.check()
    config = load_config(config_path)
    check_protocol(config, protocol_path)  # exit 2, before anything is written
    plan = RunPlan.build(config, options, command="feasibility")  # one job, sim or poc
    check_members(plan.config, as_json=as_json)  # before FLARE starts
    log_path = plan.out / "console.log"
    say = err_console if as_json else console
    if plan.force:
        say_line = lambda line: say.print(line, markup=False, highlight=False)  # noqa: E731
        empty_run_folder(plan.out, inputs=plan.inputs(), say=say_line)
    say.print(f"FLARE's own output goes to {log_path}")
    with console_output_to(log_path, terminal_fd=2 if as_json else 1) as terminal:
        status = Console(file=terminal)
        try:
            result = run_feasibility(
                plan, protocol_path, status=lambda line: status.print(line, markup=False, style="dim")
            )
        except FederatedRunError as exc:
            raise RunFailed(str(exc)) from None
    report = write_report(result.document, plan.out)
    plots = write_plots(result.document, plan.out / "plots")
    return result, report, plots


def register(app: typer.Typer) -> None:
    @app.command("feasibility")
    def feasibility(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        protocol: Path = typer.Option(..., "--protocol", help="The protocol.yaml: named criteria over obs columns."),
        env: str = typer.Option("sim", "--env", help="'sim' (FLARE simulator) or 'poc' (real FLARE processes)."),
        out: Path = typer.Option(..., "--out", help="Folder for feasibility.json, report.md, the plots and logs."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: privacy.he.enabled)."),
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr."
        ),
        force: bool = typer.Option(
            False, "--force", help="Empty --out first when it holds an earlier run (a folder holds one run)."
        ),
    ) -> None:
        """Protocol feasibility across the members (no training): the attrition funnel, each criterion's
        relaxation gain and the eligible patients by stratum, small cells suppressed; with screening
        capacities in consortium.yaml's feasibility: section, the months to the target enrollment."""
        from consortium.feasibility_output import table_lines

        result, report, plots = execute(
            config, protocol, RunOptions(out=out, env=env, he=he, force=force), as_json=as_json
        )
        if as_json:
            document = {
                "feasibility_path": str(result.path),
                "report": str(report),
                "plots": [str(p) for p in plots],
                "job_id": result.job_id,
                "feasibility": result.document,
            }
            typer.echo(json.dumps(document, indent=2))
            return
        for line in table_lines(result.document):
            console.print(line, markup=False, highlight=False)
        console.print(f"feasibility: {result.path}\nreport: {report}", markup=False, highlight=False)
