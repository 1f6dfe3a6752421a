"""``consortium report``: the report of a job submitted to provisioned kits, from what its server kept."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from consortium.commands.run import print_summary
from consortium.orchestration import report_from_job
from schema.config import load_config
from schema.errors import UserError

console = Console()


def download_job(job_id: str, *, kit: Path, username: str | None = None) -> Path:
    """Download a finished job with a lead's (or the operator's) admin kit into the kit's transfer folder;
    returns its folder. The user name defaults to the kit folder's name (provisioning names it so)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    user = username or Path(kit).name
    try:
        session = new_secure_session(user, str(kit), timeout=60)
    except Exception as exc:
        raise UserError(f"--kit {kit}: cannot log in as '{user}' ({exc}); give the admin kit of a lead") from None
    try:
        return Path(session.download_job_result(job_id))
    except Exception as exc:
        raise UserError(f"job {job_id}: cannot download it with {kit} ({exc}); only its org's lead may") from None
    finally:
        session.close()


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
    ) -> None:
        """Build report.json/report.md of a job from what the operator's server received."""
        if (kit is None) == (job_dir is None):
            raise UserError("give either --kit LEAD_KIT (download the job) or --job-dir FOLDER (already downloaded)")
        consortium = load_config(config)
        folder = job_dir or download_job(job, kit=kit)
        result = report_from_job(consortium, job_folder=folder, job_id=job, out=out, client_context=client_context)
        print_summary(result)
