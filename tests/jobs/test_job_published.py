"""The server's record of what each site published: one strict-JSON line per site and round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from jobs.he.filters import EncryptSections
from jobs.published import PublishedResultsRecorder, json_safe
from jobs.sections import PUBLISHED_META, weighted_update
from schema.names import PUBLISHED_FILE


@pytest.fixture
def server(server_run) -> tuple[FLContext, Path]:
    """The server's FLContext for job 'job-1' in round 1 and the path of its published.jsonl."""
    fl_ctx, run_dir = server_run
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=False)
    return fl_ctx, run_dir / PUBLISHED_FILE


def _result(published: dict | None, *, site: str, current_round: int) -> Shareable:
    params, meta = weighted_update({"trunk.0.bias": np.ones(16)}, weights={"trunk": 4.0})
    if published is not None:
        meta[PUBLISHED_META] = published
    shareable = DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return shareable


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_result_appends_one_record(server):
    fl_ctx, path = server
    recorder = PublishedResultsRecorder()
    val = {"resp": {"auroc": 0.71, "auprc": float("nan")}}
    first = _result({"round": 0, "val": val, "epsilon": None, "steps": np.int64(12)}, site="pharma-a", current_round=0)
    assert recorder.process(first, fl_ctx) is first
    test = {"resp": {"auroc": 0.68, "ci": [0.55, 0.8], "n": 40}}
    recorder.process(_result({"round": 1, "val": val, "test": test}, site="pharma-b", current_round=1), fl_ctx)

    records = _records(path)
    assert [(r["site"], r["round"]) for r in records] == [("pharma-a", 0), ("pharma-b", 1)]
    assert records[0]["val"] == {"resp": {"auroc": 0.71, "auprc": None}}  # NaN as null: strict JSON
    assert records[0]["steps"] == 12 and records[0]["epsilon"] is None and "test" not in records[0]
    assert records[1]["test"] == test
    assert all(r["bytes_received"] == 16 * 8 for r in records)  # the float64 trunk that arrived


def test_encrypted_results_record_their_ciphertext_bytes(server, kits, site_ctx):
    fl_ctx, path = server
    encrypted = EncryptSections().process(
        _result({"round": 0}, site="pharma-a", current_round=0), site_ctx(kits["site-1"])
    )
    PublishedResultsRecorder().process(encrypted, fl_ctx)
    (record,) = _records(path)
    assert record["bytes_received"] > 16 * 8  # a CKKS ciphertext is far larger than 16 float64 values
    assert record["bytes_received"] == sum(len(c) for c in encrypted["DXO"]["data"]["ciphertexts"]["trunk"])


def test_results_without_a_published_record_are_not_recorded(server):
    fl_ctx, path = server
    recorder = PublishedResultsRecorder()
    for result in (
        _result(None, site="pharma-a", current_round=0),
        make_reply(ReturnCode.EXECUTION_EXCEPTION),
        Shareable(),
    ):
        assert recorder.process(result, fl_ctx) is result
    with pytest.raises(FileNotFoundError):
        _records(path)


def test_json_safe_makes_strict_json():
    value = {"a": np.float32(0.5), "b": [float("inf"), np.int64(3)], 4: (float("nan"),), "c": "x"}
    assert json_safe(value) == {"a": 0.5, "b": [None, 3], "4": [None], "c": "x"}
    json.dumps(json_safe(value), allow_nan=False)
    assert json_safe(math.pi) == math.pi
