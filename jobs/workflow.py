"""The server's round workflow: FLARE's ``ScatterAndGather``, paced by its own ``task_check_period``, and masked.

NVFlare 2.9 drops the workflow's ``task_check_period`` on the way to its communicator, which then
checks its tasks every 0.2 s whatever the job says (:mod:`jobs.flare_tuning`); twice per round, the
server sat idle up to 0.2 s after the last result came in. :class:`SumScatterAndGather` hands the
period over. With ``secure_aggregation`` it also tells every member the round's member list (a header
of the train task) and opens each round's masked sum through :class:`jobs.secure_round.MaskedRound`.
Everything else is FLARE's: same arguments, same rounds, same events.
"""

from __future__ import annotations

import threading

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.wf_comm_spec import WFCommSpec
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from jobs.flare_tuning import pace_task_checks
from jobs.secure_aggregation import HEADER, REFUSAL_HEADER, plan_header
from jobs.secure_round import MaskedRound


class SumScatterAndGather(ScatterAndGather):
    """``ScatterAndGather`` whose communicator checks its tasks every ``task_check_period`` seconds.

    ``secure_aggregation``: the members mask their updates (:mod:`jobs.member_masks`); ``holders`` are
    each endpoint's members and ``min_members`` is ``training.min_members`` (for the shortest list).
    """

    # *args and **kwargs both: FLARE's job export then reads the parent's parameters too
    def __init__(
        self, *args, secure_aggregation: bool = False, holders: dict | None = None, min_members: int = 0, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.secure_aggregation = bool(secure_aggregation)
        self.holders = dict(holders or {})
        self.min_members = int(min_members or 0)
        self.abort_signal: Signal | None = None
        self.task_timeout = int(kwargs.get("train_timeout", 0) or 0)
        """Seconds a masked round's extra tasks wait for the members (the round's deadline)."""
        self._plan_lock = threading.Lock()
        self._planned_round: int | None = None

    def set_communicator(self, communicator: WFCommSpec) -> None:
        super().set_communicator(communicator)
        pace_task_checks(communicator, workflow=self)

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        if self.secure_aggregation:
            self.aggregator = MaskedRound(
                self.aggregator, workflow=self, holders=self.holders, min_members=self.min_members or None
            )

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        self.abort_signal = abort_signal
        super().control_flow(abort_signal, fl_ctx)

    def _prepare_train_task_data(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        if self.secure_aggregation:
            with self._plan_lock:
                if self._planned_round != self._current_round:
                    members = sorted(c.name for c in self._engine.get_clients())
                    self.aggregator.begin(members)
                    client_task.task.data.set_header(HEADER, plan_header(members, exchange=0, sections=None))
                    self._planned_round = self._current_round
        super()._prepare_train_task_data(client_task, fl_ctx)

    def _accept_train_result(self, client_name: str, result, fl_ctx: FLContext, is_unknown_task: bool = False) -> bool:
        reason = result.get_header(REFUSAL_HEADER) if self.secure_aggregation else None
        if reason and client_name not in self.aggregator.members:
            self.log_warning(
                fl_ctx, f"{client_name} joined after round {self._current_round}'s list: from the next one"
            )
            return False
        if reason:
            self.system_panic(
                f"round {self._current_round}: {client_name} refused to mask its update: {reason}", fl_ctx
            )
            return False
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result, fl_ctx: FLContext
    ) -> None:
        if self.secure_aggregation and task_name == self.train_task_name:
            self.log_warning(
                fl_ctx, f"late {task_name} result of {client.name} dropped: its round is masked and closed"
            )
            return
        super().process_result_of_unknown_task(client, task_name, client_task_id, result, fl_ctx)


__all__ = ["AppConstants", "SumScatterAndGather"]
