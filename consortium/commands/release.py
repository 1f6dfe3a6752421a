"""``consortium release``: a job run on provisioned kits, released by a member's key custodian.

Before anything is written the job is checked (:mod:`consortium.release`): the folder holds one job, the
one ``--job`` names; its aggregate and records are what the server recorded in ``digests.jsonl``; the key
is the one the aggregate was encrypted for; the counts it opens are plausible. A failed check exits 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from consortium.commands.run import print_summary, result_json
from consortium.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("release")
    def release(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        job: str = typer.Option(..., "--job", help="The FLARE job id."),
        out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md, audit.jsonl, MLflow."),
        kit: Path = typer.Option(None, "--kit", help="A lead's admin kit: download the job from the server."),
        job_dir: Path = typer.Option(
            None, "--job-dir", help="An already downloaded job's folder (one job) instead of --kit."
        ),
        keys: Path = typer.Option(
            None, "--keys", help="HE: the key custodian's secret context (client_context.tenseal, or its folder)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Download a job, verify it (exit 1 naming what differs, nothing written), decrypt, report, audit."""
        from consortium.release import release_job  # MLflow, torch, NVFlare: loaded only for this command
        from schema.config import load_config

        consortium = load_config(config)
        result = release_job(consortium, job_id=job, out=out, kit=kit, job_dir=job_dir, keys=keys)
        registered = result.report["tracking"].get("registered_model")
        if as_json:
            typer.echo(result_json(result, registered_model=registered, audit=str(Path(out) / "audit.jsonl")))
            return
        print_summary(result)
        if registered:
            console.print(f"registered model: {registered} (mlflow.pyfunc.load_model)")
        console.print(f"audit log: {Path(out) / 'audit.jsonl'}")
