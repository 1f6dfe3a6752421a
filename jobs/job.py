"""The consortium job as a script, NVFlare hello-pt style: run it in the simulator, or export it.

    python jobs/job.py --config consortium.yaml [--rounds N]             # FLARE simulator, plaintext
    python jobs/job.py --config consortium.yaml --export-to DIR [--no-he]  # for nvflare job submit

An export takes HE from ``privacy.he.enabled``; ``--no-he`` may only turn it off (with a warning). It
ships no code (leads have no ``byoc`` right on provisioned kits): every site runs the ``jobs`` package
it installed, which its ``local/resources.json`` allows.
``consortium run`` / ``consortium export`` do the same with progress, reports and POC.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from jobs.recipe import build_recipe, export_job, job_name
from schema.config import ConsortiumConfig, load_config
from schema.errors import UserError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the consortium job in FLARE's simulator, or export it.")
    parser.add_argument("--config", type=Path, required=True, help="consortium.yaml")
    parser.add_argument("--rounds", type=_positive, default=None, help="override training.rounds")
    parser.add_argument("--export-to", type=Path, default=None, help="export the job into this folder")
    parser.add_argument("--no-he", action="store_true", help="export without encrypted aggregation")
    parser.add_argument(
        "--workspace", type=Path, default=None, help="simulator folder (default: runs/ beside the config)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except UserError as exc:  # the message names the file, the field and the fix: no traceback
        parser.exit(exc.exit_code, f"error: {exc}\n")
    if args.export_to is not None:
        he = config.privacy.he.enabled and not args.no_he
        if config.privacy.he.enabled and args.no_he:
            log.warning("exporting WITHOUT encryption although privacy.he.enabled is true: member sites refuse it")
        folder = export_job(config, args.export_to, he=he, rounds=args.rounds)
        print(f"job exported to {folder}; submit it with a lead's admin kit:\n  {submit_command(config, folder)}")
        return
    from nvflare.recipe import SimEnv

    workspace = args.workspace or args.config.resolve().parent / "runs"
    recipe = build_recipe(config, he=False, config_path=config.source, rounds=args.rounds)
    run = recipe.run(SimEnv(clients=[m.name for m in config.members], workspace_root=str(workspace)))
    print(f"job {run.get_job_id()} ({job_name(config)}) done; workspace {workspace}")


def submit_command(config: ConsortiumConfig, folder: Path) -> str:
    """The ``nvflare job submit`` line for ``folder``, with the first member's lead kit as the example
    (``consortium provision --out KITS`` writes each lead's kit to ``KITS/<lead e-mail>``)."""
    first = config.members[0]
    lead = first.admin or f"lead@{first.name}.org"  # the rule of provisioning.project.lead
    return f"nvflare job submit -j {folder} --startup-kit KITS/{lead}"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a job needs at least 1 round")
    return value


if __name__ == "__main__":
    main()
