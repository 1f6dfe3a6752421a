"""Site-policy filter that a member installs in its own ``local/privacy.json``.

:class:`RequireEncryptedResult` is the member's second safeguard (the first: the client script only
ever puts the trunk, shared heads and summable statistics into an ``FLModel``): no plaintext model
leaves the site, even from a job that forgot HE. ``local/privacy.json`` of a member::

    {"scopes": [{"name": "consortium-he",
                 "task_result_filters": [{"path": "jobs.site_policy.RequireEncryptedResult", "args": {}}]}]}

(``provisioning.policies.privacy_policy`` writes it; with no ``default_scope``, FLARE refuses to deploy a
job that does not name the scope, so a job without HE cannot slip past it by naming none.)

Filter order (NVFlare 2.9): a site scope's result filters run BEFORE the job's own result filters, so
when :meth:`RequireEncryptedResult.process` runs, the job's :class:`~jobs.he.filters.EncryptSections`
has not encrypted the update yet. The check that counts therefore runs on the client engine's
``AFTER_TASK_RESULT_FILTER`` event, which carries the final reply: if it still holds a plaintext model,
its content is scrubbed and its return code set to ``UNSAFE_JOB`` before it is sent.
"""

from __future__ import annotations

import numbers

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from jobs.he.payload import is_encrypted_dxo

SAFE, PLAINTEXT, UNDECLARED = "safe", "plaintext", "undeclared"
# what may travel in plaintext besides the encrypted update: named summaries, never per-sample content
MAX_METRICS = 256
MAX_META_ENTRIES = 256
MAX_META_LIST = 4096
MAX_META_NUMBERS = 64
MAX_META_STRING = 512


def classify_result(shareable: Shareable) -> str:
    """``"safe"`` (no payload, a bounded set of numeric metrics, or our encrypted update, each with a
    meta of bounded summaries), ``"plaintext"`` (a model in the clear) or ``"undeclared"`` (data dressed
    as metrics or meta: arrays, strings such as sample IDs, long lists, too many entries)."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return SAFE  # error replies carry no model
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        payload = {k: v for k, v in shareable.items() if k != ReservedHeaderKey.HEADERS}
        return PLAINTEXT if payload else SAFE  # a raw, non-DXO payload could be anything
    if not _declared(dxo.meta or {}):
        return UNDECLARED
    if is_encrypted_dxo(dxo):
        return SAFE
    if dxo.data_kind == DataKind.METRICS:
        return SAFE if _few_numbers(dxo.data) else UNDECLARED
    return PLAINTEXT


def _few_numbers(data) -> bool:
    """Metrics are a bounded number of named numbers: no strings (sample IDs), no arrays (a data matrix)."""
    values = list(data.values()) if isinstance(data, dict) else [data]
    return len(values) <= MAX_METRICS and all(
        isinstance(v, (numbers.Number, bool)) or (isinstance(v, np.ndarray | np.generic) and np.ndim(v) == 0)
        for v in values
    )


def _declared(meta, *, depth: int = 0) -> bool:
    """The plaintext meta holds summaries only: short lists, short strings, numbers, bounded in size."""
    if depth > 8:
        return False
    if isinstance(meta, dict):
        if len(meta) > MAX_META_ENTRIES:
            return False
        return all(isinstance(k, str) and _declared(v, depth=depth + 1) for k, v in meta.items())
    if isinstance(meta, list | tuple):
        numeric = sum(isinstance(v, (numbers.Number, np.generic)) and not isinstance(v, bool) for v in meta)
        # key names and shapes may be long lists; numbers in a list (one per sample?) may not
        return (
            numeric <= MAX_META_NUMBERS
            and len(meta) <= MAX_META_LIST
            and all(_declared(v, depth=depth + 1) for v in meta)
        )
    if isinstance(meta, str):
        return len(meta) <= MAX_META_STRING
    if isinstance(meta, np.ndarray):
        return meta.ndim == 0
    return meta is None or isinstance(meta, (numbers.Number, bool, np.generic))


class RequireEncryptedResult(Filter):
    """Task-result filter (site policy): no result that carries a plaintext model leaves the site."""

    def __init__(self) -> None:
        super().__init__()
        self._watched_engines: set[int] = set()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        self._watch_final_result(fl_ctx)
        if classify_result(shareable) != SAFE:
            self.log_info(fl_ctx, "plaintext result: it must be encrypted by the job's filters before it is sent")
        return shareable

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
        verdict = classify_result(result) if isinstance(result, Shareable) else SAFE
        if verdict != SAFE:
            scrub_result(result)
            self.log_error(
                fl_ctx,
                f"site policy RequireEncryptedResult: this job would send {_WHAT[verdict]}; it was "
                "removed and the result marked UNSAFE_JOB. Run the consortium's HE job (consortium run --he, or "
                "jobs.recipe.build_recipe(..., he=True)), which sends only the encrypted update and bounded summaries",
            )


_WHAT = {
    PLAINTEXT: "a plaintext model",
    UNDECLARED: "content that is not a declared result (arrays, strings or long lists as metrics or meta)",
}


def scrub_result(result: Shareable) -> None:
    """Empty ``result`` in place, keeping its headers (task id, round), and mark it ``UNSAFE_JOB``."""
    headers = dict(result.get(ReservedHeaderKey.HEADERS, {}))
    headers.pop(ReservedHeaderKey.CONTENT_TYPE, None)
    result.clear()
    result[ReservedHeaderKey.HEADERS] = headers
    result.set_return_code(ReturnCode.UNSAFE_JOB)
