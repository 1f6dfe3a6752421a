"""The operator's side of a masked round: exchanges until the sections' masks cancel, then the self masks.

:class:`MaskedRound` wraps the job's :class:`jobs.aggregation.SectionSumAggregator` inside the workflow
(:class:`jobs.workflow.SumScatterAndGather`). It records which sections each member sent; when the round's
``train`` results are in, it compares them with the plan the members masked for (the round's member list
and each section's predicted holders, :mod:`jobs.secure_aggregation`). If a member is missing or a
section's holders differ, it asks the members that answered to send again for the lists it saw
(``secagg_resend``, exchange ``k + 1``); then it asks each contributor of the last exchange for its
self-mask seed (``secagg_reveal``, an aux message: no task poll to wait for) and has the aggregator take
those self masks off the sum. The
operator never sees a member's update unmasked, and opens one exchange per round only.
"""

from __future__ import annotations

from collections.abc import Mapping

from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from jobs.he.masks import RoundBinding, required_members
from jobs.he.self_mask import RevealedSelfMask
from jobs.sections import sections_of
from jobs.secure_aggregation import (
    HEADER,
    MAX_EXCHANGES,
    REFUSAL_HEADER,
    SEED_META,
    plan_header,
    predicted_holders,
    seen_holders,
)
from schema.names import SECAGG_RESEND_TASK, SECAGG_REVEAL_TOPIC

REVEAL_TIMEOUT = 60.0
"""Seconds the server waits for the members' self-mask seeds (one small aux message each)."""


class SecureAggregationFailed(RuntimeError):
    """A masked round could not be opened; the message names the round, the members and the cause."""


class MaskedRound(Aggregator):
    """The workflow's aggregator under secure aggregation (delegates the sums to ``inner``)."""

    def __init__(self, inner: Aggregator, *, workflow, holders: Mapping[str, list[str]], min_members: int | None):
        super().__init__()
        self.inner, self.workflow = inner, workflow
        self.holders, self.required = dict(holders), required_members(min_members)
        self.members: list[str] = []
        self._sent: dict[str, list[str]] = {}

    def begin(self, members: list[str]) -> None:
        """The round's member list, as the train task told every member."""
        self.members = sorted(members)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        contributor = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default=None)
        try:
            sections = sorted(sections_of(from_shareable(shareable).meta))
        except ValueError:
            sections = []
        accepted = self.inner.accept(shareable, fl_ctx)
        if accepted and contributor:
            self._sent[contributor] = sections
        return accepted

    def reset(self, fl_ctx: FLContext | None) -> None:
        self._sent = {}
        self.inner.reset(fl_ctx)

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        members, told, exchange = list(self.members), None, 0
        while True:
            answered = sorted(self._sent)
            self._enough(answered, members, round_=round_, exchange=exchange)
            seen = seen_holders(self._sent)
            planned = told or {s: predicted_holders(s, members, self.holders) for s in seen}
            if answered == members and all(planned.get(s) == h for s, h in seen.items()):
                break
            exchange += 1
            if exchange >= MAX_EXCHANGES:
                raise SecureAggregationFailed(
                    f"round {round_}: the members' masks did not agree after {MAX_EXCHANGES} exchanges; see their logs"
                )
            members, told = answered, seen
            self.log_info(fl_ctx, f"round {round_}: masked again (exchange {exchange}) by {members}")
            self.reset(fl_ctx)
            self._ask(SECAGG_RESEND_TASK, members, plan_header(members, exchange=exchange, sections=told), fl_ctx)
        binding = RoundBinding.of(fl_ctx.get_job_id(), round_, members, exchange=exchange)
        seeds = self._reveal(members, plan_header(members, exchange=exchange, sections=told), fl_ctx)
        self.inner.unmask = (binding, {s: [RevealedSelfMask(seeds[m]) for m in h] for s, h in seen.items()})
        try:
            return self.inner.aggregate(fl_ctx)
        finally:
            self.inner.unmask = None

    def _enough(self, answered: list[str], members: list[str], *, round_: int, exchange: int) -> None:
        if len(answered) >= self.required:
            return
        silent = sorted(set(members) - set(answered))
        raise SecureAggregationFailed(
            f"round {round_}: {len(answered)} members ({answered}) sent a masked update in exchange {exchange}, "
            f"silent: {silent}; secure aggregation needs at least {self.required} (max(3, training.min_members)), "
            "so the round cannot be opened: the job ends"
        )

    def _ask(self, task_name: str, members: list[str], header: dict, fl_ctx: FLContext) -> None:
        data = Shareable()
        data.set_header(HEADER, header)
        round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        data.set_header(AppConstants.CURRENT_ROUND, round_)
        data.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_)

        refusals: dict[str, str] = {}

        def received(client_task: ClientTask, fl_ctx: FLContext) -> None:
            result, name = client_task.result, client_task.client.name
            if result.get_header(REFUSAL_HEADER):
                refusals[name] = str(result.get_header(REFUSAL_HEADER))
            elif result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
                result.set_peer_props({ReservedKey.IDENTITY_NAME: name, **(result.get_peer_props() or {})})
                self.accept(result, fl_ctx)
            else:
                self.log_warning(fl_ctx, f"{name} refused to send again: {result.get_return_code()}")
            client_task.result = None

        task = Task(name=task_name, data=data, timeout=self.workflow.task_timeout, result_received_cb=received)
        self.workflow.broadcast_and_wait(
            task=task,
            targets=members,
            min_responses=len(members),
            wait_time_after_min_received=0,
            fl_ctx=fl_ctx,
            abort_signal=self.workflow.abort_signal,
        )
        if refusals:
            said = "; ".join(f"{name}: {reason}" for name, reason in sorted(refusals.items()))
            raise SecureAggregationFailed(f"round {round_}: members refused to {task_name.split('_')[1]}: {said}")

    def _reveal(self, members: list[str], header: dict, fl_ctx: FLContext) -> dict[str, bytes]:
        """Each contributor's self-mask seed of the exchange opened, asked in one aux message per member.

        An aux request reaches a member over its open connection at once; a task would wait for the
        member's next poll (up to ``task_request_interval``) and the workflow's next check of the task.
        """
        request = Shareable()
        request.set_header(HEADER, header)
        round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        request.set_header(AppConstants.CURRENT_ROUND, round_)
        replies = fl_ctx.get_engine().send_aux_request(
            targets=list(members), topic=SECAGG_REVEAL_TOPIC, request=request, timeout=REVEAL_TIMEOUT, fl_ctx=fl_ctx
        )
        seeds: dict[str, bytes] = {}
        refusals: dict[str, str] = {}
        for name in members:
            reply = replies.get(name)
            if not isinstance(reply, Shareable):
                continue
            if reply.get_header(REFUSAL_HEADER):
                refusals[name] = str(reply.get_header(REFUSAL_HEADER))
                continue
            if reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                self.log_warning(fl_ctx, f"{name} answered the reveal with {reply.get_return_code()}")
                continue
            try:
                seed = bytes.fromhex(str(from_shareable(reply).meta.get(SEED_META, "")))
            except ValueError:
                continue
            if len(seed) == 32:
                seeds[name] = seed
        if refusals:
            said = "; ".join(f"{name}: {reason}" for name, reason in sorted(refusals.items()))
            raise SecureAggregationFailed(f"round {round_}: members refused to reveal: {said}")
        missing = sorted(set(members) - set(seeds))
        if missing:
            raise SecureAggregationFailed(
                f"round {round_}: {missing} sent a masked update but no self-mask seed within {REVEAL_TIMEOUT:g} s; "
                "the sum stays masked (a member lost between its update and its reveal ends the round: "
                "docs/governance.md)"
            )
        return seeds
