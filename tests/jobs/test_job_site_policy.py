"""RequireEncryptedResult, a member's site policy: only ciphertext (or scalar metrics) leaves the site."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from jobs.he.filters import EncryptSections
from jobs.he.payload import encrypt_update
from jobs.sections import weighted_update
from jobs.site_policy import PLAINTEXT, SAFE, UNDECLARED, RequireEncryptedResult, classify_result, scrub_result
from schema.names import HE_SCOPE, TRAIN_TASK


def _plain() -> Shareable:
    params, meta = weighted_update({"trunk.0.weight": np.ones((4, 3))}, weights={"trunk": 2.0})
    shareable = DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable()
    shareable.set_header("task_id", "t-1")
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 3)
    return shareable


def _encrypted(member_context) -> Shareable:
    params, meta = weighted_update({"trunk.0.weight": np.ones((4, 3))}, weights={"trunk": 2.0})
    return encrypt_update(member_context, params, meta=meta).to_dxo().to_shareable()


class _Engine:
    def __init__(self) -> None:
        self.handlers: list = []

    def add_handler(self, handler) -> None:
        self.handlers.append(handler)

    def fire_event(self, event_type, fl_ctx) -> None:
        pass  # log_error reports through the engine


class _SiteScope:
    """What FLARE's task_utils.get_filters reads of a site's privacy scope (``local/privacy.json``)."""

    def __init__(self, name: str, result_filter) -> None:
        self.name = name
        self.task_data_filters: dict = {}
        self.task_result_filters = {FilterKey.OUT: [result_filter]}


def _member_ctx(policy: RequireEncryptedResult, *, engine: _Engine | None = None, site_root=None) -> FLContext:
    """A member's context in the HE scope, whose task result filters start with ``policy``."""
    scope = _SiteScope(HE_SCOPE, policy)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, TRAIN_TASK, private=True, sticky=False)
    if site_root is not None:
        fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(root_dir=str(site_root)), private=True, sticky=False)
    if engine is not None:
        fl_ctx.put(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return fl_ctx


def _final(policy: RequireEncryptedResult, result: Shareable, fl_ctx: FLContext) -> Shareable:
    """What the client engine does after every filter: fire AFTER_TASK_RESULT_FILTER with the reply."""
    fl_ctx.set_prop(FLContextKey.TASK_RESULT, result, private=True, sticky=False)
    policy.handle_event(EventType.AFTER_TASK_RESULT_FILTER, fl_ctx)
    return result


def test_ciphertext_scalar_metrics_and_errors_are_safe(member_context):
    for result in (
        _encrypted(member_context),
        DXO(DataKind.METRICS, data={"auroc": 0.71, "n": 40}).to_shareable(),
        make_reply(ReturnCode.EXECUTION_EXCEPTION),
        Shareable(),
    ):
        assert classify_result(result) == SAFE


def test_model_payloads_in_any_other_form_are_plaintext():
    stock_he = DXO(DataKind.WEIGHTS, data={"w": b"\x00" * 64}, meta={MetaKey.PROCESSED_ALGORITHM: "CKKS"})
    diff = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3)})
    forged = DXO(DataKind.APP_DEFINED, data={"ciphertexts": {"trunk": [np.ones(3)]}}, meta={"he_format": "x"})
    raw = Shareable()
    raw["weights"] = np.ones(3)
    for result in (
        _plain(),
        stock_he.to_shareable(),
        diff.to_shareable(),
        forged.to_shareable(),
        raw,
    ):
        assert classify_result(result) == PLAINTEXT


def test_policy_passes_results_on_and_watches_the_final_one_once(member_context):
    policy, engine = RequireEncryptedResult(), _Engine()
    fl_ctx = _member_ctx(policy, engine=engine)
    plain = _plain()
    assert policy.process(plain, fl_ctx) is plain  # the job's encryptor has not run yet: no verdict here
    assert classify_result(plain) == PLAINTEXT
    policy.process(_encrypted(member_context), fl_ctx)
    assert engine.handlers == [policy]  # subscribed once per engine


@pytest.mark.fault
def test_a_plaintext_final_result_is_scrubbed_and_marked_unsafe():
    policy = RequireEncryptedResult()
    fl_ctx = _member_ctx(policy, engine=_Engine())
    leaked = _final(policy, _plain(), fl_ctx)
    assert leaked.get_return_code() == ReturnCode.UNSAFE_JOB
    assert leaked.get_header("task_id") == "t-1"  # the server can still match the reply to its task
    assert leaked.get_cookie(AppConstants.CONTRIBUTION_ROUND) == 3
    assert "DXO" not in leaked and classify_result(leaked) == SAFE


def test_scrub_keeps_headers_only():
    result = _plain()
    scrub_result(result)
    assert set(result) == {"__headers__"} and result.get_return_code() == ReturnCode.UNSAFE_JOB
    with pytest.raises(ValueError):
        from_shareable(result)


def test_the_he_job_gets_through_the_real_filter_chain(kits):
    """NVFlare's own chain (site scope first, then the job's filters) with the job's real encryptor."""
    policy, engine = RequireEncryptedResult(), _Engine()
    fl_ctx = _member_ctx(policy, engine=engine, site_root=kits["site-1"])
    job_filters = {TRAIN_TASK + FilterKey.DELIMITER + FilterKey.OUT: [EncryptSections()]}
    out = apply_filters("task_result_filters", _plain(), fl_ctx, job_filters, TRAIN_TASK, FilterKey.OUT)
    assert engine.handlers == [policy]  # the site's filter ran in the chain and now watches the final result
    final = _final(policy, out, fl_ctx)
    assert final.get_return_code(ReturnCode.OK) == ReturnCode.OK and classify_result(final) == SAFE
    assert "ciphertexts" in from_shareable(final).data


def test_a_job_without_encryption_sends_nothing_through_the_real_filter_chain():
    policy = RequireEncryptedResult()
    fl_ctx = _member_ctx(policy, engine=_Engine())
    job_filters = {TRAIN_TASK + FilterKey.DELIMITER + FilterKey.OUT: []}
    out = apply_filters("task_result_filters", _plain(), fl_ctx, job_filters, TRAIN_TASK, FilterKey.OUT)
    final = _final(policy, out, fl_ctx)
    assert final.get_return_code() == ReturnCode.UNSAFE_JOB and "DXO" not in final


def test_an_encryptor_for_another_task_does_not_count(kits):
    policy = RequireEncryptedResult()
    fl_ctx = _member_ctx(policy, engine=_Engine(), site_root=kits["site-1"])
    job_filters = {"submit_model" + FilterKey.DELIMITER + FilterKey.OUT: [EncryptSections()]}
    out = apply_filters("task_result_filters", _plain(), fl_ctx, job_filters, TRAIN_TASK, FilterKey.OUT)
    assert _final(policy, out, fl_ctx).get_return_code() == ReturnCode.UNSAFE_JOB


@pytest.mark.fault
def test_data_dressed_as_metrics_or_meta_is_refused(member_context):
    rng = np.random.default_rng(0)
    whole_matrix = DXO(DataKind.METRICS, data={f"v{i}": float(v) for i, v in enumerate(rng.normal(size=100_000))})
    sample_ids = DXO(DataKind.METRICS, data={f"s{i}": f"patient-{i}:1" for i in range(20)})
    per_sample_meta = _encrypted(member_context)
    dxo = from_shareable(per_sample_meta)
    dxo.meta["consortium_published"] = {"round": 1, "test": {"os": {"risk": rng.normal(size=500).tolist()}}}
    dxo.update_shareable(per_sample_meta)
    arrays_as_metrics = DXO(DataKind.METRICS, data={"w": np.ones(10)})
    for result in (
        whole_matrix.to_shareable(),
        sample_ids.to_shareable(),
        per_sample_meta,
        arrays_as_metrics.to_shareable(),
    ):
        assert classify_result(result) == UNDECLARED


def test_a_sites_real_last_round_result_is_declared(member_context):
    """What jobs/site.py publishes in its last round (figures, intervals, sample counts) passes the bound."""
    published = {
        "round": 1,
        "total_rounds": 2,
        "steps": 44,
        "train_loss": 0.7,
        "epsilon": None,
        "seconds": 3.2,
        "val": {t: {"auroc": 0.8, "auprc": 0.7} for t in ("a", "b", "c")},
        "test": {t: {"auroc": 0.8, "auprc": 0.7, "ci": [0.7, 0.9], "n": 45} for t in ("a", "b", "c")},
        "samples": {"train": 210, "val": 45, "test": 45},
    }
    result = _encrypted(member_context)
    dxo = from_shareable(result)
    dxo.meta["consortium_published"] = published
    dxo.update_shareable(result)
    assert classify_result(result) == SAFE
    assert classify_result(DXO(DataKind.METRICS, data={"val_primary": 0.8, "n": 40}).to_shareable()) == SAFE


@pytest.mark.fault
def test_undeclared_content_is_scrubbed_at_the_end_of_the_chain():
    policy = RequireEncryptedResult()
    result = DXO(DataKind.METRICS, data={f"v{i}": 0.5 for i in range(1000)}).to_shareable()
    _final(policy, result, _member_ctx(policy))
    assert result.get_return_code() == ReturnCode.UNSAFE_JOB
    assert classify_result(result) == SAFE  # nothing is left in it
