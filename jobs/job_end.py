"""A server component that marks, in the job's run folder, when the job's results are complete and when
the job has ended.

FLARE fires ``ABOUT_TO_END_RUN`` and then ``END_RUN`` to the server's components in the order the job
lists them; this one is listed last (:func:`jobs.recipe.build_recipe`). At ``ABOUT_TO_END_RUN`` the
workflow is over: every round's aggregate is stored and every record written (the members kept their
own outputs before they sent their last update). At ``END_RUN`` every other component has ended too, the
tracking receiver's runs included. What the process does after that is FLARE's own teardown (the
simulator: ~5 s of grace periods), which ``consortium run`` does not wait for (:mod:`consortium.simulator`).

The mark, :data:`schema.names.JOB_ENDED_FILE`, is JSON: ``job_id``, ``results_at`` (a time), then also
``ended_at``; ``fatal`` is true when FLARE recorded a fatal error in the run.
"""

from __future__ import annotations

import json
import os
import time

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from schema.names import JOB_ENDED_FILE

_STAGES = {EventType.ABOUT_TO_END_RUN: "results_at", EventType.END_RUN: "ended_at"}


class MarkJobEnded(FLComponent):
    """Write ``job_ended.json`` atomically in the run folder at ``ABOUT_TO_END_RUN`` and at ``END_RUN``."""

    def __init__(self) -> None:
        super().__init__()
        self._mark: dict = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        stage = _STAGES.get(event_type)
        if stage is None:
            return
        job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID) or fl_ctx.get_job_id()
        self._mark.update(job_id=job_id, fatal=bool(fl_ctx.get_prop(FLContextKey.FATAL_SYSTEM_ERROR, False)))
        self._mark[stage] = time.time()
        path = os.path.join(fl_ctx.get_engine().get_workspace().get_run_dir(job_id), JOB_ENDED_FILE)
        partial = f"{path}.partial"
        with open(partial, "w") as handle:
            json.dump(self._mark, handle)
        os.replace(partial, path)
        if stage == "ended_at":
            self.log_info(fl_ctx, f"job {job_id}: every component has ended it")
