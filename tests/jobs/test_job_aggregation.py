"""The server's components driven directly (no FLARE processes): add sections, pass the sum on, store it.

Plaintext and HE: in HE mode the members' real filters encrypt and decrypt against the contexts in their
``startup/`` folders, and the aggregator adds under the server's public context.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from jobs.aggregation import (
    SectionAggregatePersistor,
    SectionShareableGenerator,
    SectionSumAggregator,
    is_sectioned,
)
from jobs.he.context import context_from_bytes
from jobs.he.filters import DecryptAggregate, EncryptSections
from jobs.he.payload import DATA_KEY, ENCRYPTED_KIND, decrypt_update, is_encrypted_dxo
from jobs.sections import SECTIONS_META, finalize, sections_of, weighted_update
from jobs.store import read_aggregate
from schema.names import CLIENT_CONTEXT_FILE, GLOBAL_MODEL_FILE, SERVER_CONTEXT_FILE

TOLERANCE = 1e-6
STEPS = (12.0, 20.0, 8.0)


def _params(seed: int, *, head: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "trunk.0.weight": rng.normal(scale=0.3, size=(32, 150)),
        "trunk.0.bias": rng.normal(scale=0.1, size=32),
        "stats.os.information": rng.uniform(10, 500, size=150),
        "consensus.os.score": rng.dirichlet(np.ones(150)),
    }
    if head:
        params["heads.os.0.weight"] = rng.normal(scale=0.3, size=(4, 32))
    return params


def _result(params: dict[str, np.ndarray], steps: float, *, site: str, current_round: int = 0) -> Shareable:
    """A site's task result as the Client API makes it from ``MemberSite.train_round``'s FLModel."""
    weights = {"trunk": steps, **({"head:os": steps} if "heads.os.0.weight" in params else {})}
    weighted, meta = weighted_update(params, weights=weights)
    shareable = DXO(DataKind.WEIGHTS, data=weighted, meta={**meta, "NUM_STEPS_CURRENT_ROUND": steps}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, current_round)
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return shareable


@pytest.fixture(scope="module")
def members() -> list[dict[str, np.ndarray]]:
    """Three members; only the first two hold the shared endpoint 'os'."""
    return [_params(1, head=True), _params(2, head=True), _params(3, head=False)]


def _check_means_and_sums(plain: dict[str, np.ndarray], members: list[dict[str, np.ndarray]], *, tol: float) -> None:
    for key in ("trunk.0.weight", "trunk.0.bias"):
        expected = sum(n * m[key] for m, n in zip(members, STEPS, strict=True)) / sum(STEPS)
        assert np.max(np.abs(plain[key] - expected)) < tol, key
    expected = (STEPS[0] * members[0]["heads.os.0.weight"] + STEPS[1] * members[1]["heads.os.0.weight"]) / 32.0
    assert np.max(np.abs(plain["heads.os.0.weight"] - expected)) < tol
    for key in ("stats.os.information", "consensus.os.score"):
        np.testing.assert_allclose(plain[key], sum(m[key] for m in members), rtol=tol, err_msg=key)


# -- plaintext ------------------------------------------------------------------------------------


def test_plaintext_aggregator_adds_sections(members, kits, site_ctx):
    aggregator = SectionSumAggregator()
    server = site_ctx(kits["server"], current_round=2)
    for i, (params, steps) in enumerate(zip(members, STEPS, strict=True)):
        assert aggregator.accept(_result(params, steps, site=f"site-{i + 1}", current_round=2), server)
    dxo = from_shareable(aggregator.aggregate(server))

    assert dxo.data_kind == DataKind.WEIGHTS and dxo.get_meta_prop(AppConstants.CURRENT_ROUND) == 2
    sections = sections_of(dxo.meta)
    assert {n: (s.weight, s.contributors) for n, s in sections.items()} == {
        "trunk": (40.0, 3),
        "head:os": (32.0, 2),
        "stats:os": (3.0, 3),
        "consensus:os": (3.0, 3),
    }
    # the server holds sums, not means: nothing was divided there
    summed = sum(n * m["trunk.0.bias"] for m, n in zip(members, STEPS, strict=True))
    np.testing.assert_allclose(dxo.data["trunk.0.bias"], summed)
    _check_means_and_sums(finalize(dxo.data, dxo.meta), members, tol=1e-12)


def test_aggregator_refuses_errors_duplicates_late_and_unsectioned_results(members, kits, site_ctx, caplog):
    caplog.set_level("WARNING")
    aggregator = SectionSumAggregator()
    server = site_ctx(kits["server"], current_round=1)
    assert not aggregator.accept(make_reply(ReturnCode.EXECUTION_EXCEPTION), server)
    assert aggregator.accept(_result(members[0], 3, site="site-1", current_round=1), server)
    assert not aggregator.accept(_result(members[0], 3, site="site-1", current_round=1), server)  # twice
    assert not aggregator.accept(_result(members[1], 3, site="site-2", current_round=0), server)  # late
    bare = DXO(DataKind.WEIGHTS, data={"trunk.0.bias": np.ones(32)}).to_shareable()
    bare.set_peer_props({ReservedKey.IDENTITY_NAME: "site-3"})
    bare.add_cookie(AppConstants.CONTRIBUTION_ROUND, 1)
    assert not aggregator.accept(bare, server)  # no sections meta
    other = _result({"trunk.0.bias": np.ones(32)}, 3, site="site-3", current_round=1)
    assert not aggregator.accept(other, server)  # other trunk keys than the first contribution's
    assert sections_of(from_shareable(aggregator.aggregate(server)).meta)["trunk"].contributors == 1
    for reason in (
        "site-1 already contributed to round 1",
        "site-2 sent round 0 in round 1; late",
        "refusing site-3's result: the result carries no sections meta",
        "refusing site-3's result: section 'trunk' arrives with other keys",
    ):
        assert reason in caplog.text

    aggregator.reset(server)
    with pytest.raises(RuntimeError, match="no member sent an update this round; check the members' logs"):
        aggregator.aggregate(server)
    assert aggregator.accept(_result(members[0], 3, site="site-1", current_round=1), server)  # a new round


def test_plaintext_aggregator_refuses_ciphertext(members, kits, site_ctx):
    encrypted = EncryptSections().process(_result(members[0], 3, site="site-1"), site_ctx(kits["site-1"]))
    aggregator = SectionSumAggregator()
    assert not aggregator.accept(encrypted, site_ctx(kits["server"]))


def test_generator_sends_round_zero_plain_and_the_sum_as_is(members, kits, site_ctx):
    generator = SectionShareableGenerator()
    fl_ctx = site_ctx(kits["server"])
    initial = make_model_learnable({"trunk.0.bias": np.zeros(4, dtype=np.float32)}, {})
    assert not is_sectioned(initial)
    round_zero = from_shareable(generator.learnable_to_shareable(initial, fl_ctx))
    assert round_zero.data_kind == DataKind.WEIGHTS and np.array_equal(round_zero.data["trunk.0.bias"], np.zeros(4))

    aggregator = SectionSumAggregator()
    assert aggregator.accept(_result(members[0], 5, site="site-1"), fl_ctx)
    model = generator.shareable_to_learnable(aggregator.aggregate(fl_ctx), fl_ctx)
    assert is_sectioned(model)
    task = from_shareable(generator.learnable_to_shareable(model, fl_ctx))
    assert task.data_kind == DataKind.WEIGHTS and set(sections_of(task.meta)) == {
        "trunk",
        "head:os",
        "stats:os",
        "consensus:os",
    }
    np.testing.assert_array_equal(task.data["trunk.0.bias"], 5 * members[0]["trunk.0.bias"])

    with pytest.raises(ValueError, match="the aggregate carries no sections meta; the job needs SectionSumAggregator"):
        generator.shareable_to_learnable(
            DXO(DataKind.WEIGHTS, data={"trunk.0.bias": np.ones(2)}).to_shareable(), fl_ctx
        )


def test_persistor_stores_the_plaintext_sum(members, kits, site_ctx, tmp_path):
    aggregator = SectionSumAggregator()
    fl_ctx = site_ctx(kits["server"])
    for i, (params, steps) in enumerate(zip(members, STEPS, strict=True)):
        assert aggregator.accept(_result(params, steps, site=f"site-{i + 1}"), fl_ctx)
    model = SectionShareableGenerator().shareable_to_learnable(aggregator.aggregate(fl_ctx), fl_ctx)
    persistor = SectionAggregatePersistor(model=None)
    persistor.log_dir = str(tmp_path)
    persistor.save_model(model, fl_ctx)

    stored = read_aggregate(tmp_path / GLOBAL_MODEL_FILE)
    assert stored.encrypted is None
    _check_means_and_sums(finalize(stored.params, stored.meta), members, tol=1e-12)


# -- homomorphic encryption -----------------------------------------------------------------------


def _encrypted_round(kits, site_ctx, members, *, current_round: int = 0):
    aggregator = SectionSumAggregator(he=True)
    server = site_ctx(kits["server"], current_round=current_round)
    aggregator.handle_event(EventType.START_RUN, server)
    encrypt = EncryptSections()
    for i, (params, steps) in enumerate(zip(members, STEPS, strict=True)):
        site = f"site-{i + 1}"
        result = encrypt.process(_result(params, steps, site=site, current_round=current_round), site_ctx(kits[site]))
        assert is_encrypted_dxo(from_shareable(result))
        assert aggregator.accept(result, server)
    return aggregator.aggregate(server)


def test_members_encrypt_server_adds_member_decrypts(members, kits, site_ctx):
    aggregate = _encrypted_round(kits, site_ctx, members)
    assert is_encrypted_dxo(from_shareable(aggregate))

    generator = SectionShareableGenerator()
    server = site_ctx(kits["server"])
    global_model = generator.shareable_to_learnable(aggregate, server)
    task_data = generator.learnable_to_shareable(global_model, server)
    assert from_shareable(task_data).data_kind == ENCRYPTED_KIND
    task_data.set_header(AppConstants.CURRENT_ROUND, 1)

    received = DecryptAggregate().process(task_data, site_ctx(kits["site-3"]))
    dxo = from_shareable(received)
    assert dxo.data_kind == DataKind.WEIGHTS and received.get_header(AppConstants.CURRENT_ROUND) == 1
    sections = sections_of(dxo.meta)
    assert (sections["trunk"].weight, sections["head:os"].weight, sections["head:os"].contributors) == (40.0, 32.0, 2)
    _check_means_and_sums(finalize(dxo.data, dxo.meta), members, tol=TOLERANCE)


def test_encrypted_result_keeps_headers_and_sections_meta_in_plaintext(members, kits, site_ctx):
    result = EncryptSections().process(_result(members[0], 7, site="site-1"), site_ctx(kits["site-1"]))
    dxo = from_shareable(result)
    assert dxo.data_kind == ENCRYPTED_KIND
    assert sections_of(dxo.meta)["trunk"].weight == 7.0
    assert dxo.get_meta_prop("NUM_STEPS_CURRENT_ROUND") == 7.0
    assert dxo.get_meta_prop("consortium_wire_bytes") == sum(len(c) for s in dxo.data[DATA_KEY].values() for c in s)
    assert result.get_cookie(AppConstants.CONTRIBUTION_ROUND) == 0
    assert set(dxo.data) == {DATA_KEY} and all(isinstance(c, bytes) for s in dxo.data[DATA_KEY].values() for c in s)


def test_he_aggregator_refuses_plaintext_duplicates_and_late_results(members, kits, site_ctx):
    aggregator = SectionSumAggregator(he=True)
    server = site_ctx(kits["server"], current_round=1)
    assert not aggregator.accept(_result(members[0], 3, site="site-1", current_round=1), server)  # plaintext

    encrypt = EncryptSections()
    fresh = encrypt.process(_result(members[0], 3, site="site-1", current_round=1), site_ctx(kits["site-1"]))
    assert aggregator.accept(fresh, server)
    again = encrypt.process(_result(members[0], 3, site="site-1", current_round=1), site_ctx(kits["site-1"]))
    assert not aggregator.accept(again, server)
    late = encrypt.process(_result(members[1], 3, site="site-2", current_round=0), site_ctx(kits["site-2"]))
    assert not aggregator.accept(late, server)

    aggregator.reset(server)
    with pytest.raises(RuntimeError, match="no member sent an encrypted update this round"):
        aggregator.aggregate(server)


def test_server_refuses_a_secret_context(kits, site_ctx, tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "startup" / SERVER_CONTEXT_FILE).write_bytes(
        (kits["site-1"] / "startup" / CLIENT_CONTEXT_FILE).read_bytes()
    )
    with pytest.raises(ValueError, match="holds a SECRET key, but the operator's server must only hold the public"):
        SectionSumAggregator(he=True).handle_event(EventType.START_RUN, site_ctx(tmp_path))


def test_persistor_stores_the_encrypted_sum_as_is(members, kits, site_ctx, tmp_path):
    aggregate = _encrypted_round(kits, site_ctx, members)
    server = site_ctx(kits["server"])
    model = SectionShareableGenerator().shareable_to_learnable(aggregate, server)
    assert set(model[ModelLearnableKey.WEIGHTS]) == {DATA_KEY}
    persistor = SectionAggregatePersistor(model=None)
    persistor.log_dir = str(tmp_path)
    persistor.save_model(model, server)

    stored = read_aggregate(tmp_path / GLOBAL_MODEL_FILE)
    assert stored.params is None and set(stored.encrypted.sections) == {"trunk", "head:os", "stats:os", "consensus:os"}
    assert stored.meta[SECTIONS_META] == stored.encrypted.meta[SECTIONS_META]
    secret = context_from_bytes(
        (kits["site-1"] / "startup" / CLIENT_CONTEXT_FILE).read_bytes(), source="member", private=True
    )
    plain = finalize(decrypt_update(secret, stored.encrypted), stored.meta)
    _check_means_and_sums(plain, members, tol=TOLERANCE)


# -- continuing an interrupted job ------------------------------------------------------------------


def test_a_continuing_job_starts_from_the_stored_plaintext_sum(members, kits, site_ctx, tmp_path):
    aggregator = SectionSumAggregator()
    fl_ctx = site_ctx(kits["server"], current_round=2)
    for i, (params, steps) in enumerate(zip(members, STEPS, strict=True)):
        assert aggregator.accept(_result(params, steps, site=f"site-{i + 1}", current_round=2), fl_ctx)
    stored_by = SectionAggregatePersistor(model=None)
    stored_by.log_dir = str(tmp_path)
    stored_by.save_model(
        SectionShareableGenerator().shareable_to_learnable(aggregator.aggregate(fl_ctx), fl_ctx), fl_ctx
    )
    assert read_aggregate(tmp_path / GLOBAL_MODEL_FILE).round == 2

    resumed = SectionAggregatePersistor(model=None, resume_from=str(tmp_path / GLOBAL_MODEL_FILE))
    model = resumed.load_model(site_ctx(kits["server"]))
    assert is_sectioned(model)
    dxo = from_shareable(SectionShareableGenerator().learnable_to_shareable(model, fl_ctx))
    _check_means_and_sums(finalize(dxo.data, dxo.meta), members, tol=1e-12)


def test_a_continuing_he_job_sends_the_stored_ciphertext_that_members_open(members, kits, site_ctx, tmp_path):
    aggregate = _encrypted_round(kits, site_ctx, members, current_round=3)
    server = site_ctx(kits["server"], current_round=3)
    stored_by = SectionAggregatePersistor(model=None)
    stored_by.log_dir = str(tmp_path)
    stored_by.save_model(SectionShareableGenerator().shareable_to_learnable(aggregate, server), server)

    resumed = SectionAggregatePersistor(model=None, resume_from=str(tmp_path / GLOBAL_MODEL_FILE))
    model = resumed.load_model(site_ctx(kits["server"]))
    task_data = SectionShareableGenerator().learnable_to_shareable(model, server)
    assert from_shareable(task_data).data_kind == ENCRYPTED_KIND  # the operator sends it as stored: ciphertext
    task_data.set_header(AppConstants.CURRENT_ROUND, 4)
    dxo = from_shareable(DecryptAggregate().process(task_data, site_ctx(kits["site-2"])))
    assert dxo.data_kind == DataKind.WEIGHTS
    _check_means_and_sums(finalize(dxo.data, dxo.meta), members, tol=TOLERANCE)
