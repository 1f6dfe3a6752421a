"""What the operator's server records of each site's result, besides the model: ``published.jsonl``.

Each site puts what it publishes (per-round validation figures, the final test figures with their
intervals, DP epsilon, timings) into its result's meta under :data:`jobs.sections.PUBLISHED_META`.
:class:`PublishedResultsRecorder`, a server-side task-result filter, appends it, with the site's name,
the round and the bytes that actually arrived, to ``published.jsonl`` in the job's run folder on the
server. That folder is what ``nvflare job download`` returns, so a report can be built from it for
a job run anywhere: simulator, POC or provisioned kits.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from jobs.he.filters import WIRE_BYTES_META
from jobs.he.payload import DATA_KEY, is_encrypted_dxo
from jobs.sections import PUBLISHED_META
from schema.names import PUBLISHED_FILE


def json_safe(value: Any) -> Any:
    """NaN and inf become ``None``, numpy scalars plain numbers, recursively (strict JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def payload_bytes(shareable: Shareable) -> int:
    """Bytes of the model payload as it arrived: ciphertext chunks, or the arrays' buffers."""
    dxo = from_shareable(shareable)
    if is_encrypted_dxo(dxo):
        return sum(len(c) for chunks in dxo.data[DATA_KEY].values() for c in chunks)
    data = dxo.data if isinstance(dxo.data, dict) else {}
    return int(sum(np.asarray(v).nbytes for v in data.values() if isinstance(v, np.ndarray | list)))


class PublishedResultsRecorder(Filter):
    """Server task-result filter: append each site's published record to the run's ``published.jsonl``."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        published = (dxo.meta or {}).get(PUBLISHED_META)
        if not isinstance(published, dict):
            return shareable
        record = {
            "site": shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default=None),
            "round": shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND)),
            "bytes_received": int(dxo.meta.get(WIRE_BYTES_META) or payload_bytes(shareable)),
            **published,
        }
        path = self._path(fl_ctx)
        line = json.dumps(json_safe(record), allow_nan=False)
        with self._lock, open(path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return shareable

    @staticmethod
    def _path(fl_ctx: FLContext) -> str:
        workspace = fl_ctx.get_engine().get_workspace()
        job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID) or fl_ctx.get_job_id()
        return os.path.join(workspace.get_run_dir(job_id), PUBLISHED_FILE)
