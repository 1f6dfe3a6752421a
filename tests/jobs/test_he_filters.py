"""The members' HE filters on what is not a sectioned model, and with the wrong context installed."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply

from jobs.he.filters import DecryptAggregate, EncryptSections
from jobs.sections import weighted_update
from schema.names import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE


def _weights(steps: float = 2.0):
    return weighted_update({"trunk.0.bias": np.linspace(-1, 1, 6)}, weights={"trunk": steps})


def test_metrics_errors_and_ciphertext_pass_the_encryptor_untouched(kits, site_ctx):
    encrypt = EncryptSections()
    fl_ctx = site_ctx(kits["site-1"])
    metrics = DXO(DataKind.METRICS, data={"auroc": 0.7}).to_shareable()
    assert encrypt.process(metrics, fl_ctx) is metrics
    assert from_shareable(metrics).data == {"auroc": 0.7}
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert encrypt.process(error, fl_ctx) is error
    params, meta = _weights()
    encrypted = encrypt.process(DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable(), fl_ctx)
    chunks = from_shareable(encrypted).data["ciphertexts"]
    assert from_shareable(encrypt.process(encrypted, fl_ctx)).data["ciphertexts"] == chunks  # not encrypted twice


def test_encryptor_refuses_a_model_without_sections(kits, site_ctx):
    bare = DXO(DataKind.WEIGHTS, data={"trunk.0.bias": np.ones(3)}).to_shareable()
    with pytest.raises(ValueError, match="EncryptSections got a DataKind.WEIGHTS result without sections meta"):
        EncryptSections().process(bare, site_ctx(kits["site-1"]))
    params, meta = _weights()
    diff = DXO(DataKind.WEIGHT_DIFF, data=params, meta=meta).to_shareable()
    with pytest.raises(ValueError, match="got a DataKind.WEIGHT_DIFF result"):
        EncryptSections().process(diff, site_ctx(kits["site-1"]))


def test_round_zero_plaintext_model_passes_through_decrypt(kits, site_ctx):
    initial = DXO(DataKind.WEIGHTS, data={"trunk.0.bias": np.zeros(4, dtype=np.float32)}).to_shareable()
    received = DecryptAggregate().process(initial, site_ctx(kits["site-1"]))
    assert received is initial and np.array_equal(from_shareable(received).data["trunk.0.bias"], np.zeros(4))


def test_decrypt_restores_the_sum_ready_values(kits, site_ctx):
    params, meta = _weights(steps=3.0)
    encrypted = EncryptSections().process(
        DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable(), site_ctx(kits["site-1"])
    )
    dxo = from_shareable(DecryptAggregate().process(encrypted, site_ctx(kits["site-2"])))
    assert dxo.data_kind == DataKind.WEIGHTS and set(dxo.data) == {"trunk.0.bias"}
    assert np.max(np.abs(dxo.data["trunk.0.bias"] - 3.0 * np.linspace(-1, 1, 6))) < 1e-6
    assert dxo.meta["consortium_sections"] == meta["consortium_sections"]


def test_member_without_a_secret_context_cannot_start(kits, site_ctx, tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    public = (kits["server"] / "startup" / SERVER_CONTEXT_FILE).read_bytes()
    (tmp_path / "startup" / CLIENT_CONTEXT_FILE).write_bytes(public)
    with pytest.raises(ValueError, match=f"{CLIENT_CONTEXT_FILE}: holds no secret key, so this member could not"):
        EncryptSections().handle_event(EventType.START_RUN, site_ctx(tmp_path))
    with pytest.raises(ValueError, match=r"missing.tenseal: no HE context here; run the key ceremony"):
        DecryptAggregate(tenseal_context_file="missing.tenseal").handle_event(EventType.START_RUN, site_ctx(tmp_path))
