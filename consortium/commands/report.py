"""``consortium report``: the report of a job submitted to provisioned kits; ``consortium release`` under
its earlier name and options (``--client-context`` for ``--keys``), the same code path."""

from __future__ import annotations

from pathlib import Path

import typer

from consortium.commands.run import print_summary, result_json


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        job: str = typer.Option(..., "--job", help="The FLARE job id."),
        out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md and the MLflow store."),
        kit: Path = typer.Option(None, "--kit", help="A lead's admin kit: download the job from the server."),
        job_dir: Path = typer.Option(None, "--job-dir", help="An already downloaded job folder instead of --kit."),
        client_context: Path = typer.Option(
            None, "--client-context", help="HE: a member's secret context (its kit's startup/client_context.tenseal)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Build report.json/report.md of a job from what the operator's server received (= release)."""
        from consortium.release import release_job  # MLflow, torch, NVFlare: loaded only for this command
        from schema.config import load_config

        consortium = load_config(config)
        result = release_job(consortium, job_id=job, out=out, kit=kit, job_dir=job_dir, keys=client_context)
        if as_json:
            typer.echo(result_json(result))
        else:
            print_summary(result)
