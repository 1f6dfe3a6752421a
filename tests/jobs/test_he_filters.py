"""The FLARE components of the HE job, driven directly (no FLARE processes): member -> server -> member."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from jobs.he.context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, make_contexts
from jobs.he.filters import DecryptAggregate, EncryptWeightedUpdate
from jobs.he.payload import ENCRYPTED_KIND, is_encrypted_dxo
from jobs.he.server import (
    ENCRYPTED_MODEL_FILE,
    CiphertextSumAggregator,
    EncryptedAggregatePersistor,
    EncryptedAggregateShareableGenerator,
)
from jobs.he.store import decrypt_aggregate_file

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Path]:
    """Startup folders as the key ceremony leaves them: secret context for members, public for the server."""
    client, server = make_contexts()
    root = tmp_path_factory.mktemp("kits")
    sites = {}
    for name, file, data in [
        ("site-1", CLIENT_CONTEXT_FILE, client),
        ("site-2", CLIENT_CONTEXT_FILE, client),
        ("server", SERVER_CONTEXT_FILE, server),
    ]:
        (root / name / "startup").mkdir(parents=True)
        (root / name / "local").mkdir()
        (root / name / "startup" / file).write_bytes(data)
        sites[name] = root / name
    return sites


def _ctx(site_root: Path, *, current_round: int = 0) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(root_dir=str(site_root)), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
    return fl_ctx


def _trunk(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "trunk.0.weight": rng.normal(scale=0.3, size=(32, 150)).astype(np.float32),
        "trunk.0.bias": rng.normal(scale=0.1, size=32).astype(np.float32),
        "trunk.4.weight": rng.normal(scale=0.3, size=(8, 32)).astype(np.float32),
    }


def _client_result(trunk: dict[str, np.ndarray], steps: int, *, site: str, current_round: int = 0) -> Shareable:
    """What the Client API makes of FLModel(params=trunk, params_type=FULL, meta={NUM_STEPS...: steps})."""
    shareable = DXO(DataKind.WEIGHTS, data=dict(trunk), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, current_round)
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return shareable


def _encrypted_round(kits, trunks, steps, *, current_round=0):
    encrypt = EncryptWeightedUpdate()
    aggregator = CiphertextSumAggregator()
    server_ctx = _ctx(kits["server"], current_round=current_round)
    aggregator.handle_event(EventType.START_RUN, server_ctx)
    for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
        site = f"site-{i + 1}"
        result = encrypt.process(_client_result(trunk, n, site=site, current_round=current_round), _ctx(kits[site]))
        assert aggregator.accept(result, server_ctx)
    return aggregator, aggregator.aggregate(server_ctx)


def test_member_encrypts_server_adds_member_decrypts(kits):
    trunks, steps = [_trunk(1), _trunk(2)], [12, 20]
    _, aggregate = _encrypted_round(kits, trunks, steps)
    assert is_encrypted_dxo(from_shareable(aggregate))

    generator = EncryptedAggregateShareableGenerator()
    server_ctx = _ctx(kits["server"])
    global_model = generator.shareable_to_learnable(aggregate, server_ctx)
    task_data = generator.learnable_to_shareable(global_model, server_ctx)
    task_data.set_header(AppConstants.CURRENT_ROUND, 1)

    received = DecryptAggregate().process(task_data, _ctx(kits["site-2"]))
    dxo = from_shareable(received)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert received.get_header(AppConstants.CURRENT_ROUND) == 1
    for key in trunks[0]:
        expected = (12 * trunks[0][key].astype(np.float64) + 20 * trunks[1][key]) / 32
        assert dxo.data[key].shape == expected.shape
        assert np.max(np.abs(dxo.data[key] - expected)) < TOLERANCE


def test_encrypted_result_keeps_headers_and_weight_in_plaintext(kits):
    result = EncryptWeightedUpdate().process(_client_result(_trunk(3), 7, site="site-1"), _ctx(kits["site-1"]))
    dxo = from_shareable(result)
    assert dxo.data_kind == ENCRYPTED_KIND
    assert dxo.get_meta_prop("he_weight") == 7.0
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 7
    assert result.get_cookie(AppConstants.CONTRIBUTION_ROUND) == 0
    assert all(isinstance(c, bytes) for c in dxo.data["ciphertexts"])


def test_round_zero_plaintext_model_passes_through_decrypt(kits):
    initial = make_model_learnable({"trunk.0.bias": np.zeros(4, dtype=np.float32)}, {})
    task_data = EncryptedAggregateShareableGenerator().learnable_to_shareable(initial, _ctx(kits["server"]))
    received = DecryptAggregate().process(task_data, _ctx(kits["site-1"]))
    assert np.array_equal(from_shareable(received).data["trunk.0.bias"], np.zeros(4))


def test_encrypt_needs_the_step_count(kits):
    shareable = DXO(DataKind.WEIGHTS, data=_trunk(4)).to_shareable()
    with pytest.raises(ValueError, match="NUM_STEPS_CURRENT_ROUND"):
        EncryptWeightedUpdate().process(shareable, _ctx(kits["site-1"]))


def test_encrypt_refuses_weight_diffs(kits):
    shareable = DXO(DataKind.WEIGHT_DIFF, data=_trunk(4), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1}).to_shareable()
    with pytest.raises(ValueError, match="params_type=FULL"):
        EncryptWeightedUpdate().process(shareable, _ctx(kits["site-1"]))


def test_metrics_and_errors_pass_the_encryptor_untouched(kits):
    metrics = DXO(DataKind.METRICS, data={"auroc": 0.7}).to_shareable()
    assert EncryptWeightedUpdate().process(metrics, _ctx(kits["site-1"])) is metrics
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert EncryptWeightedUpdate().process(error, _ctx(kits["site-1"])) is error


def test_member_without_a_secret_context_cannot_start(kits, tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "startup" / CLIENT_CONTEXT_FILE).write_bytes(
        (kits["server"] / "startup" / SERVER_CONTEXT_FILE).read_bytes()
    )
    with pytest.raises(ValueError, match="holds no secret key"):
        EncryptWeightedUpdate().handle_event(EventType.START_RUN, _ctx(tmp_path))
    with pytest.raises(ValueError, match="no HE context here"):
        DecryptAggregate(tenseal_context_file="missing.tenseal").handle_event(EventType.START_RUN, _ctx(tmp_path))


def test_server_refuses_a_secret_context(kits, tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "startup" / SERVER_CONTEXT_FILE).write_bytes(
        (kits["site-1"] / "startup" / CLIENT_CONTEXT_FILE).read_bytes()
    )
    with pytest.raises(ValueError, match="SECRET key"):
        CiphertextSumAggregator().handle_event(EventType.START_RUN, _ctx(tmp_path))


def test_aggregator_refuses_plaintext_duplicates_and_late_results(kits):
    aggregator = CiphertextSumAggregator()
    server_ctx = _ctx(kits["server"], current_round=1)
    assert not aggregator.accept(_client_result(_trunk(5), 3, site="site-1", current_round=1), server_ctx)

    encrypt = EncryptWeightedUpdate()
    fresh = encrypt.process(_client_result(_trunk(5), 3, site="site-1", current_round=1), _ctx(kits["site-1"]))
    assert aggregator.accept(fresh, server_ctx)
    again = encrypt.process(_client_result(_trunk(5), 3, site="site-1", current_round=1), _ctx(kits["site-1"]))
    assert not aggregator.accept(again, server_ctx)
    late = encrypt.process(_client_result(_trunk(5), 3, site="site-2", current_round=0), _ctx(kits["site-2"]))
    assert not aggregator.accept(late, server_ctx)

    aggregator.reset(server_ctx)
    with pytest.raises(RuntimeError, match="no member sent"):
        aggregator.aggregate(server_ctx)


def test_persistor_stores_the_encrypted_aggregate_as_is(kits, tmp_path):
    trunks, steps = [_trunk(6), _trunk(7)], [5, 15]
    _, aggregate = _encrypted_round(kits, trunks, steps)
    model = EncryptedAggregateShareableGenerator().shareable_to_learnable(aggregate, _ctx(kits["server"]))
    persistor = EncryptedAggregatePersistor(model=None)
    persistor.log_dir = str(tmp_path)
    persistor.save_model(model, _ctx(kits["server"]))
    assert set(model[ModelLearnableKey.WEIGHTS]) == {"ciphertexts"}

    secret = (kits["site-1"] / "startup" / CLIENT_CONTEXT_FILE).read_bytes()
    trunk = decrypt_aggregate_file(tmp_path / ENCRYPTED_MODEL_FILE, client_context=secret)
    expected = (5 * trunks[0]["trunk.0.bias"].astype(np.float64) + 15 * trunks[1]["trunk.0.bias"]) / 20
    assert np.max(np.abs(trunk["trunk.0.bias"] - expected)) < TOLERANCE
