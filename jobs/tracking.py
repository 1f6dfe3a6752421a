"""The server's MLflow receiver: one run per member, named after the member, with its parameters and
the job id the run's report carries.

NVFlare's :class:`MLflowReceiver` names each site's run ``<site>-<job id[:6]>-<job name>-<run_name>``,
tags it with the simulator's start time as the job id (every simulated job is ``simulate_job``) and logs
no parameters. :class:`MemberRuns` keeps the receiver and then, through its public accessors
(``get_run_id``, ``get_mlflow_client``), renames each run to the member, tags it with the job id the
report uses (the job's name in the simulator, FLARE's job id elsewhere) and logs the member's settings.
Checked against NVFlare 2.9.0.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

SIMULATED_JOB_ID = "simulate_job"
"""The id FLARE's simulator gives every job; the run's report names a simulated job by its name."""


def member_params(config: ConsortiumConfig, *, he: bool, rounds: int) -> dict[str, dict[str, str]]:
    """Per member, the parameters its MLflow run records: who it is, what it holds, how it trains."""
    training = config.training
    common = {
        "consortium": config.name,
        "rounds": str(rounds),
        "local_epochs": str(training.local_epochs),
        "batch_size": str(training.batch_size),
        "learning_rate": f"{training.learning_rate:g}",
        "trunk_widths": ",".join(map(str, training.trunk_widths)),
        "n_features": str(len(config.model_features())),
        "aggregation": "fedavg under HE" if he else "fedavg",
        "dp_epsilon": f"{config.privacy.dp.epsilon:g}" if config.privacy.dp.enabled else "off",
    }
    shared = set(config.shared_endpoints())
    return {
        member.name: {
            "member": member.name,
            "org": member.org,
            "tasks": ",".join(f"{t.name}:{t.type}{' (shared)' if t.name in shared else ''}" for t in member.tasks),
            **common,
        }
        for member in config.members
    }


def report_job_id(job_id: str, job_name: str | None) -> str:
    """The job id the run's report gives a job: its name in the simulator, FLARE's id otherwise.

    >>> report_job_id("simulate_job", "demo-biomarker-mtl"), report_job_id("3f2a", "demo-biomarker-mtl")
    ('demo-biomarker-mtl', '3f2a')
    """
    return job_name if job_id == SIMULATED_JOB_ID and job_name else job_id


class MemberRuns(MLflowReceiver):
    """:class:`MLflowReceiver` whose run per member is named after the member and holds its parameters.

    Parameters
    ----------
    params
        Per member, its parameters (:func:`member_params`); a site without an entry keeps only its tags.
    tracking_uri, kw_args
        As :class:`MLflowReceiver`'s.
    """

    def __init__(
        self,
        params: dict[str, dict[str, Any]] | None = None,
        tracking_uri: str | None = None,
        kw_args: dict | None = None,
    ) -> None:
        super().__init__(tracking_uri=tracking_uri, kw_args=kw_args)
        self.params = params or {}

    def initialize(self, fl_ctx: FLContext) -> None:
        super().initialize(fl_ctx)
        meta = fl_ctx.get_prop(ReservedKey.JOB_META) or {}
        job_name = meta.get(JobMetaKey.JOB_NAME) if isinstance(meta, dict) else None
        job_id = report_job_id(fl_ctx.get_job_id(), job_name)
        for site in list(self.run_ids):
            client, run_id = self.get_mlflow_client(site), self.get_run_id(site)
            if client is None or run_id is None:
                continue
            tags = {"job_id": job_id, "job_name": job_name or "", "run_name": site, "kind": "member", "member": site}
            params = self.params.get(site, {})
            try:
                client.update_run(run_id, name=site)
                client.log_batch(
                    run_id,
                    params=[Param(key, str(value)) for key, value in params.items()],
                    tags=[RunTag(key, str(value)) for key, value in tags.items()],
                )
            except MlflowException as exc:  # the run keeps NVFlare's name; the job goes on
                self.log_warning(fl_ctx, f"MLflow run of {site}: cannot name it or log its parameters ({exc})")
        log.info("MLflow runs of %s named after the members, job id %s", sorted(self.run_ids), job_id)
