"""The server's round workflow: FLARE's ``ScatterAndGather``, paced by its own ``task_check_period``.

NVFlare 2.9 drops the workflow's ``task_check_period`` on the way to its communicator, which then
checks its tasks every 0.2 s whatever the job says (:mod:`jobs.flare_tuning`); twice per round, the
server sat idle up to 0.2 s after the last result came in. :class:`SumScatterAndGather` hands the
period over. Everything else is FLARE's: same arguments, same rounds, same events.
"""

from __future__ import annotations

from nvflare.apis.wf_comm_spec import WFCommSpec
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from jobs.flare_tuning import pace_task_checks


class SumScatterAndGather(ScatterAndGather):
    """``ScatterAndGather`` whose communicator checks its tasks every ``task_check_period`` seconds."""

    def set_communicator(self, communicator: WFCommSpec) -> None:
        super().set_communicator(communicator)
        pace_task_checks(communicator, workflow=self)
