"""What the operator's server records of each site's result, besides the model: ``published.jsonl``.

Each site puts what it publishes (per-round validation figures, the final test figures with their
intervals, DP epsilon, timings) into its result's meta under :data:`jobs.sections.PUBLISHED_META`.
:class:`PublishedResultsRecorder`, a server-side task-result filter, appends it, with the site's name,
the round and the bytes that actually arrived, to ``published.jsonl`` in the job's run folder on the
server. That folder is what ``nvflare job download`` returns, so a report can be built from it for
a job run anywhere: simulator, POC or provisioned kits.

Beside it, ``digests.jsonl`` is the server's receipt of what it received: after each record, the sha256
and length of ``published.jsonl`` so far (``kind: record``); as each round completes, the sha256 of the
aggregate it stored and of the records so far (``kind: round``, written by
:class:`jobs.aggregation.SectionAggregatePersistor`). A release checks the folder against it before it
opens anything. Every line is one ``write`` to a file opened for appending, then fsynced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
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

DIGESTS_FILE = "digests.jsonl"
KIND_RECORD, KIND_ROUND = "record", "round"
RECORDS_LOCK = threading.Lock()
"""Held while ``published.jsonl`` grows and while it is hashed: the recorder and the persistor run in one
server process, so a digest never covers half a record."""


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


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n}`` of a file (read in 1 MB blocks: an encrypted aggregate is large)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def append_digest(folder: str | Path, entry: dict[str, Any]) -> None:
    """Append one line to ``folder/digests.jsonl``: one ``write`` in append mode (a reader never sees half
    a line from two writers), fsynced before the round goes on."""
    line = (json.dumps(json_safe(entry), allow_nan=False, sort_keys=True) + "\n").encode()
    descriptor = os.open(os.path.join(folder, DIGESTS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def records_digest(folder: str | Path) -> dict[str, Any]:
    """:func:`file_digest` of ``folder/published.jsonl`` as ``published_sha256``/``published_bytes`` (an
    empty file's when no record has arrived); call it holding :data:`RECORDS_LOCK`."""
    path = os.path.join(folder, PUBLISHED_FILE)
    found = file_digest(path) if os.path.exists(path) else {"sha256": hashlib.sha256(b"").hexdigest(), "bytes": 0}
    return {"published_sha256": found["sha256"], "published_bytes": found["bytes"]}


def run_folder(fl_ctx: FLContext) -> str | None:
    """The job's run folder on the server (where ``published.jsonl`` lies); ``None`` outside a job."""
    engine = fl_ctx.get_engine()
    workspace = engine.get_workspace() if engine is not None else fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID) or fl_ctx.get_job_id()
    if workspace is None or not job_id:
        return None
    return workspace.get_run_dir(job_id)


class PublishedResultsRecorder(Filter):
    """Server task-result filter: append each site's published record to the run's ``published.jsonl``."""

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
        folder = run_folder(fl_ctx)
        line = json.dumps(json_safe(record), allow_nan=False)
        with RECORDS_LOCK:
            with open(os.path.join(folder, PUBLISHED_FILE), "a") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            receipt = {"kind": KIND_RECORD, "round": record["round"], "site": record["site"]}
            append_digest(folder, {**receipt, **records_digest(folder)})
        return shareable
