"""Site-policy filters that a member installs in its own ``local/privacy.json``.

:class:`RequireEncryptedResult` is the member's second safeguard (the first: the client script
only ever puts trunk keys into an ``FLModel``): no plaintext model leaves the site, even from a
job that forgot HE. ``local/privacy.json`` of a member::

    {"scopes": [{"name": "consortium-he",
                 "task_result_filters": [{"path": "jobs.filters.RequireEncryptedResult", "args": {}}]}]}

(``provisioning.policies.privacy_policy`` writes it; with no ``default_scope``, FLARE refuses to deploy
a job that does not name the scope, so a job without HE cannot slip past it by naming none.)

Filter order (NVFlare 2.9, ``nvflare.apis.utils.task_utils.get_filters``): a site scope's result
filters run BEFORE the job's own result filters, so this filter sees the plaintext trunk that the
job's :class:`~jobs.he.filters.EncryptWeightedUpdate` is about to encrypt. It therefore checks twice:

1. when it runs (site filter, first): an encrypted result passes; a plaintext model passes only if
   an ``EncryptWeightedUpdate`` follows it in this task's filter chain, else it raises
   ``UnsafeJobError`` (the job is stopped at this site, nothing is sent);
2. after all filters (the client engine's ``AFTER_TASK_RESULT_FILTER`` event carries the final
   reply): if the final result still holds a plaintext model, its content is scrubbed and its
   return code set to ``UNSAFE_JOB`` before it is sent.
"""

from __future__ import annotations

import numbers

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.utils.task_utils import get_filters

from jobs.he.filters import EncryptWeightedUpdate
from jobs.he.payload import is_encrypted_dxo

_SAFE, _PLAINTEXT = "safe", "plaintext"


def classify_result(shareable: Shareable) -> str:
    """``"safe"`` (no payload, scalar metrics, or our encrypted trunk) or ``"plaintext"``."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return _SAFE  # error replies carry no model
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        payload = {k: v for k, v in shareable.items() if k != ReservedHeaderKey.HEADERS}
        return _PLAINTEXT if payload else _SAFE  # a raw, non-DXO payload could be anything
    if is_encrypted_dxo(dxo):
        return _SAFE
    if dxo.data_kind == DataKind.METRICS and _all_scalars(dxo.data):
        return _SAFE
    return _PLAINTEXT


def _all_scalars(data) -> bool:
    values = data.values() if isinstance(data, dict) else [data]
    return all(isinstance(v, (numbers.Number, str, bool)) or np.ndim(v) == 0 for v in values)


class RequireEncryptedResult(Filter):
    """Task-result filter (site policy): refuse any result that carries a plaintext model.

    Safe results: our encrypted trunk (:func:`jobs.he.payload.is_encrypted_dxo`), scalar
    metrics, and error replies without payload. Everything else (``WEIGHTS``, ``WEIGHT_DIFF``,
    NVFlare's per-layer HE, collections, raw payloads) is refused unless this task's job filter
    chain encrypts it after this filter.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watched_engines: set[int] = set()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        self._watch_final_result(fl_ctx)
        if classify_result(shareable) == _SAFE:
            return shareable
        if self._encrypted_later_in_chain(fl_ctx):
            self.log_info(fl_ctx, "plaintext trunk allowed through: EncryptWeightedUpdate follows in the job's chain")
            return shareable
        raise UnsafeJobError(
            "site policy RequireEncryptedResult: this job would send a plaintext model; run the consortium's "
            "HE job (jobs.he.recipe.build_he_recipe, or build_recipe(..., he=True)) so that "
            "jobs.he.filters.EncryptWeightedUpdate encrypts the trunk"
        )

    def _encrypted_later_in_chain(self, fl_ctx: FLContext) -> bool:
        """Does an EncryptWeightedUpdate run after this filter for the current task? (fail closed)"""
        runner = fl_ctx.get_prop(FLContextKey.RUNNER)
        task_name = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        job_filters = getattr(runner, "task_result_filters", None)
        if not task_name or not isinstance(job_filters, dict):
            return False
        chain = get_filters("task_result_filters", fl_ctx, job_filters, task_name, FilterKey.OUT)
        positions = [i for i, f in enumerate(chain) if f is self]
        if not positions:
            return False
        return any(isinstance(f, EncryptWeightedUpdate) for f in chain[positions[-1] + 1 :])

    def _watch_final_result(self, fl_ctx: FLContext) -> None:
        """Subscribe once per client engine to the event that carries the final, filtered result."""
        engine = fl_ctx.get_engine()
        add_handler = getattr(engine, "add_handler", None)
        if engine is None or not callable(add_handler) or id(engine) in self._watched_engines:
            return
        add_handler(self)
        self._watched_engines.add(id(engine))
        self.log_info(fl_ctx, "watching the final task results of this job for plaintext models")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.AFTER_TASK_RESULT_FILTER:
            return
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if isinstance(result, Shareable) and classify_result(result) != _SAFE:
            scrub_result(result)
            self.log_error(
                fl_ctx,
                "site policy RequireEncryptedResult: a plaintext model reached the end of the "
                "result filters; it was removed and the result marked UNSAFE_JOB",
            )


def scrub_result(result: Shareable) -> None:
    """Empty ``result`` in place, keeping its headers (task id, round), and mark it ``UNSAFE_JOB``."""
    headers = dict(result.get(ReservedHeaderKey.HEADERS, {}))
    headers.pop(ReservedHeaderKey.CONTENT_TYPE, None)
    result.clear()
    result[ReservedHeaderKey.HEADERS] = headers
    result.set_return_code(ReturnCode.UNSAFE_JOB)
