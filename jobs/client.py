"""Client API script of the consortium job: what each member site runs.

FLARE starts it once per job (in-process executor) and feeds it every round. It only wires
``flare.receive/send`` to :class:`jobs.site.MemberSite`; every setting comes from ``consortium.yaml``.

Arguments (paths and the cross-validation fold only)::

    --config PATH    consortium.yaml; default: the site's CONSORTIUM_CONFIG environment variable
    --outputs DIR    private outputs in DIR/<site name>/; default: CONSORTIUM_SITE_OUTPUTS/<site name>/,
                     else consortium_outputs/<job id>/<site name>/ in the site's FLARE workspace
    --fold K         with data.folds: the fold that is this job's test split
    --stats-only     send only the association statistics (``consortium stats``): no training
    --first-round R  this job continues an interrupted one at round R (from the trainer saved after R-1)
    --feasibility P  send only the counts of the protocol.yaml P (``consortium feasibility``): no training
    --member-counts  with --feasibility in a plaintext job: publish the member's own counts too
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.client.tracking import MLflowWriter

from jobs.flare_tuning import shorten_result_polling
from jobs.process_memory import return_freed_arrays
from jobs.site import MemberSite, serve
from jobs.site_feasibility import FeasibilitySite
from jobs.site_outputs import SiteOutputs, site_folder
from schema.config import load_config
from schema.errors import ConfigError
from schema.names import CONFIG_ENV, OUTPUTS_ENV

WORKSPACE_OUTPUTS = "consortium_outputs"

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Member site of the consortium's FLARE job.")
    parser.add_argument("--config", type=Path, default=None, help=f"consortium.yaml (default: ${CONFIG_ENV})")
    parser.add_argument("--outputs", type=Path, default=None, help=f"private outputs root (default: ${OUTPUTS_ENV})")
    parser.add_argument("--fold", type=int, default=None, help="cross-validation fold (with data.folds)")
    parser.add_argument("--stats-only", action="store_true", help="send only the association statistics")
    parser.add_argument("--first-round", type=int, default=0, help="continue an interrupted job at this round")
    parser.add_argument("--feasibility", type=Path, default=None, help="count this protocol.yaml; no training")
    parser.add_argument("--member-counts", action="store_true", help="feasibility: publish this member's counts")
    return parser.parse_args(argv)


def config_path(arg: Path | None) -> Path:
    """``--config``, else ``$CONSORTIUM_CONFIG``; a :class:`ConfigError` says how to give one."""
    if arg is not None:
        return arg
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    raise ConfigError(
        f"no consortium.yaml for this site: set {CONFIG_ENV} in the site's environment (for example in its "
        "startup kit's start.sh) to the member's own consortium.yaml, or pass --config PATH in the job's train_args"
    )


def outputs_root(arg: Path | None, *, job_id: str) -> Path:
    """``--outputs``, else ``$CONSORTIUM_SITE_OUTPUTS``, else ``consortium_outputs/<job id>`` in the site's
    FLARE workspace (FLARE runs a client's jobs with the site workspace as the current folder)."""
    if arg is not None:
        return arg
    if os.environ.get(OUTPUTS_ENV):
        return Path(os.environ[OUTPUTS_ENV])
    return Path.cwd() / WORKSPACE_OUTPUTS / job_id


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    shorten_result_polling()
    return_freed_arrays()  # arrays a member frees leave its resident memory (training excepted)
    flare.init()
    site_name = flare.get_site_name()
    config = load_config(config_path(args.config))
    member = config.member(site_name).name  # the FLARE client name is the member name
    # OMP_NUM_THREADS, set by `consortium run` when every member shares this machine, decides this
    log.info("site %s: torch uses %d threads", member, torch.get_num_threads())
    outputs = SiteOutputs(site_folder(outputs_root(args.outputs, job_id=flare.get_job_id()), member))
    if args.feasibility is not None:  # consortium feasibility: counts only, the member's data is not prepared
        site = FeasibilitySite(config, member, protocol=args.feasibility, publish_counts=args.member_counts)
        log.info("site %s: %d feasibility round(s) done", member, serve(site, flare))
        return
    site = MemberSite(
        config,
        member,
        outputs=outputs,
        tracker=MLflowWriter(),
        fold=args.fold,
        statistics_only=args.stats_only,
        first_round=args.first_round,
    )
    rounds = serve(site, flare)
    log.info("site %s: %d rounds done; private outputs in %s", member, rounds, outputs.folder)


if __name__ == "__main__":
    main()
