"""RequireEncryptedResult: a member's site policy lets only ciphertext (or scalar metrics) leave."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.private.privacy_manager import Scope

from jobs.filters import RequireEncryptedResult, classify_result
from jobs.he.context import context_from_bytes, make_contexts
from jobs.he.filters import EncryptWeightedUpdate
from jobs.he.payload import encrypt_update


@pytest.fixture(scope="module")
def member() -> ts.Context:
    return context_from_bytes(make_contexts()[0], source="client_context.tenseal", private=True)


def _plain() -> Shareable:
    trunk = {"trunk.0.weight": np.ones((4, 3), dtype=np.float32)}
    return DXO(DataKind.WEIGHTS, data=trunk, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 2}).to_shareable()


def _encrypted(member) -> Shareable:
    return encrypt_update(member, {"trunk.0.weight": np.ones((4, 3))}, weight=2.0).to_dxo().to_shareable()


class _Runner:
    def __init__(self, job_filters: dict):
        self.task_result_filters = job_filters


class _Engine:
    def __init__(self):
        self.handlers = []

    def add_handler(self, handler):
        self.handlers.append(handler)

    def fire_event(self, event_type, fl_ctx):
        pass  # log_error reports through the engine


def _site_ctx(policy: RequireEncryptedResult, job_filters: dict | None = None, *, task: str = "train") -> FLContext:
    scope = Scope()
    scope.set_name("consortium-he")
    scope.add_task_result_filter(policy, FilterKey.OUT)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.RUNNER, _Runner(job_filters or {}), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return fl_ctx


def test_plaintext_trunk_is_refused(member):
    policy = RequireEncryptedResult()
    with pytest.raises(UnsafeJobError, match="plaintext model"):
        policy.process(_plain(), _site_ctx(policy))


def test_ciphertext_metrics_and_errors_pass(member):
    policy = RequireEncryptedResult()
    for result in (_encrypted(member), DXO(DataKind.METRICS, data={"auroc": 0.71}).to_shareable(), make_reply("ERR")):
        assert policy.process(result, _site_ctx(policy)) is result


def test_other_model_payloads_are_refused(member):
    stock_he = DXO(DataKind.WEIGHTS, data={"w": b"\x00" * 64}, meta={MetaKey.PROCESSED_ALGORITHM: "CKKS"})
    arrays_as_metrics = DXO(DataKind.METRICS, data={"w": np.ones(10)})
    diff = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3)})
    raw = Shareable()
    raw["weights"] = np.ones(3)
    for result in (stock_he.to_shareable(), arrays_as_metrics.to_shareable(), diff.to_shareable(), raw):
        assert classify_result(result) == "plaintext"


def test_site_filters_run_first_and_the_job_encryptor_after_them(member, tmp_path):
    """NVFlare's own chain (site scope, then job) with the policy first: the HE job gets through."""
    policy = RequireEncryptedResult()

    class _PresetKey(EncryptWeightedUpdate):
        def _context_for(self, fl_ctx):
            return member

    encryptor = _PresetKey()
    job_filters = {"train" + FilterKey.DELIMITER + FilterKey.OUT: [encryptor]}
    fl_ctx = _site_ctx(policy, job_filters)
    out = apply_filters("task_result_filters", _plain(), fl_ctx, job_filters, "train", FilterKey.OUT)
    assert classify_result(out) == "safe"
    assert from_shareable(out).get_meta_prop("he_weight") == 2.0


def test_a_job_without_encryption_is_refused_through_the_real_chain(member):
    policy = RequireEncryptedResult()
    fl_ctx = _site_ctx(policy, {"train.out": []})
    with pytest.raises(UnsafeJobError):
        apply_filters("task_result_filters", _plain(), fl_ctx, {"train.out": []}, "train", FilterKey.OUT)


def test_encryptor_for_another_task_does_not_count(member):
    policy = RequireEncryptedResult()
    job_filters = {"submit_model.out": [EncryptWeightedUpdate()]}
    with pytest.raises(UnsafeJobError):
        policy.process(_plain(), _site_ctx(policy, job_filters, task="train"))


def test_final_result_is_checked_after_all_filters(member):
    """The second line: a plaintext result at AFTER_TASK_RESULT_FILTER is emptied and marked unsafe."""
    policy = RequireEncryptedResult()
    engine = _Engine()
    fl_ctx = _site_ctx(policy, {"train.out": [EncryptWeightedUpdate()]})
    fl_ctx.put(ReservedKey.ENGINE, engine, private=True, sticky=False)
    policy.process(_encrypted(member), fl_ctx)
    policy.process(_encrypted(member), fl_ctx)
    assert engine.handlers == [policy]  # subscribed once

    leaked = _plain()
    leaked.set_header("task_id", "t-1")
    fl_ctx.set_prop(FLContextKey.TASK_RESULT, leaked, private=True, sticky=False)
    policy.handle_event(EventType.AFTER_TASK_RESULT_FILTER, fl_ctx)
    assert leaked.get_return_code() == ReturnCode.UNSAFE_JOB
    assert leaked.get_header("task_id") == "t-1"
    assert "DXO" not in leaked and classify_result(leaked) == "safe"

    fine = _encrypted(member)
    fl_ctx.set_prop(FLContextKey.TASK_RESULT, fine, private=True, sticky=False)
    policy.handle_event(EventType.AFTER_TASK_RESULT_FILTER, fl_ctx)
    assert fine.get_return_code(ReturnCode.OK) == ReturnCode.OK and "DXO" in fine
