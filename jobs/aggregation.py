"""Operator-side FLARE components: add the sites' sections, pass the sum on, store it.

One aggregator for both modes. In plaintext it adds float64 arrays; under HE it adds CKKS ciphertexts
against the public ``server_context.tenseal`` and never decrypts (it holds no secret key: loading
refuses a context with one). Nothing here multiplies or divides: the sites weighted their values
before sending (:mod:`jobs.sections`), so the sum *is* the next global model and whoever receives it
finalizes it.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import (
    ModelLearnable,
    ModelLearnableKey,
    make_model_learnable,
    model_learnable_to_dxo,
)
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from jobs.he.context import WorkspaceContext, load_context_from_workspace, public_fingerprint
from jobs.he.masked_words import WordSum, is_masked_dxo
from jobs.he.masks import mask_ciphertexts
from jobs.he.payload import DATA_KEY, ENCRYPTED_KIND, CiphertextSum, EncryptedUpdate, is_encrypted_dxo
from jobs.published import KIND_ROUND, RECORDS_LOCK, append_digest, file_digest, records_digest, run_folder
from jobs.sections import SECTIONS_META, add_sections, sections_of
from jobs.store import read_aggregate, write_aggregate
from schema.names import GLOBAL_MODEL_FILE, SERVER_CONTEXT_FILE


def is_sectioned(model: ModelLearnable) -> bool:
    """True for a global model that is a sum of sections (every round after round 0)."""
    return bool((model.get(ModelLearnableKey.META) or {}).get(SECTIONS_META))


class SectionSumAggregator(Aggregator):
    """Sums the members' sections (plaintext arrays, or ciphertexts with ``he=True``); never decrypts.

    Parameters
    ----------
    he
        Expect encrypted updates and add them under the operator's public context.
    tenseal_context_file
        With ``he``: the public context in the server kit's ``startup/`` folder.
    """

    def __init__(self, he: bool = False, tenseal_context_file: str = SERVER_CONTEXT_FILE) -> None:
        super().__init__()
        self.he = bool(he)
        self.tenseal_context_file = tenseal_context_file
        self._he = WorkspaceContext(tenseal_context_file, private=False) if self.he else None
        self._lock = threading.Lock()
        self.unmask = None
        """Under secure aggregation: ``(binding, {section: revealed self masks})`` to take off the sum
        (:class:`jobs.secure_round.MaskedRound` sets it for the round's aggregation)."""
        self.reset(None)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if self._he is not None:
            self._he.on_event(event_type, fl_ctx)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        contributor = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{contributor} returned {rc}; its contribution is disregarded")
            return False
        if current_round is not None and contribution_round != current_round:
            self.log_warning(fl_ctx, f"{contributor} sent round {contribution_round} in round {current_round}; late")
            return False
        try:
            dxo = from_shareable(shareable)
            with self._lock:
                if contributor in self._seen:
                    self.log_warning(fl_ctx, f"{contributor} already contributed to round {current_round}")
                    return False
                self._add(dxo, fl_ctx)
                self._seen.add(contributor)
        except (ValueError, TypeError, KeyError) as exc:
            self.log_error(fl_ctx, f"refusing {contributor}'s result: {exc}")
            return False
        self.log_info(fl_ctx, f"added {contributor}'s update to round {current_round}")
        return True

    def _add(self, dxo: DXO, fl_ctx: FLContext) -> None:
        if self.he:
            if self._cipher is None:
                self._cipher = CiphertextSum(self._he.get(fl_ctx))
            self._cipher.add(EncryptedUpdate.from_dxo(dxo))
            return
        if is_masked_dxo(dxo):
            if self._sums:
                raise ValueError("masked words after plaintext sections in one round; every member masks or none")
            self._words = self._words or WordSum()
            self._words.add(dxo)
            return
        if self._words is not None:
            raise ValueError("plaintext sections after masked words in one round; every member masks or none")
        if is_encrypted_dxo(dxo) or dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected plaintext sections (WEIGHTS), got {dxo.data_kind}")
        sections = sections_of(dxo.meta)
        if not sections:
            raise ValueError("the result carries no sections meta; the site must use jobs.sections.weighted_update")
        updated = add_sections(self._sections, sections)
        for section in sections.values():
            for key in section.keys:
                value = np.asarray(dxo.data[key], dtype=np.float64)
                self._sums[key] = value.copy() if key not in self._sums else self._sums[key] + value
        self._sections = updated

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        round_meta = {AppConstants.CURRENT_ROUND: fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}
        with self._lock:
            if self.he:
                if self._cipher is None:
                    raise RuntimeError("no member sent an encrypted update this round; check the members' logs")
                result = self._cipher.result()
                if self.unmask is not None:
                    binding, sources = self.unmask
                    context = self._he.get(fl_ctx)
                    for name, part in result.sections.items():
                        if sources.get(name):
                            part.chunks = mask_ciphertexts(
                                context, sources[name], binding, section=name, chunks=part.chunks, subtract=True
                            )
                result.meta.update(round_meta)
                dxo = result.to_dxo()
            elif self._words is not None:
                if self.unmask is None:
                    raise RuntimeError("masked words but no revealed self masks; the workflow must open the round")
                binding, sources = self.unmask
                dxo = self._words.result(unmask=sources, binding=binding)
                dxo.meta.update(round_meta)
            else:
                if not self._sections:
                    raise RuntimeError("no member sent an update this round; check the members' logs")
                meta = {SECTIONS_META: {n: s.to_meta() for n, s in self._sections.items()}, **round_meta}
                dxo = DXO(data_kind=DataKind.WEIGHTS, data=dict(self._sums), meta=meta)
        self.log_info(fl_ctx, f"aggregated {len(self._seen)} members' sections")
        return dxo.to_shareable()

    def reset(self, fl_ctx: FLContext | None) -> None:
        with self._lock:
            self._seen: set[str] = set()
            self._sums: dict[str, np.ndarray] = {}
            self._sections = None
            self._cipher: CiphertextSum | None = None
            self._words: WordSum | None = None


class SectionShareableGenerator(ShareableGenerator):
    """Sends the global model as it is: plain in round 0, the (possibly encrypted) sum afterwards."""

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        weights = model.get(ModelLearnableKey.WEIGHTS) or {}
        meta = dict(model.get(ModelLearnableKey.META) or {})
        if not is_sectioned(model):
            return model_learnable_to_dxo(model).to_shareable()
        kind = ENCRYPTED_KIND if _encrypted_weights(weights) else DataKind.WEIGHTS
        return DXO(data_kind=kind, data=weights, meta=meta).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if not sections_of(dxo.meta):
            raise ValueError("the aggregate carries no sections meta; the job needs SectionSumAggregator")
        return make_model_learnable(weights=dict(dxo.data), meta_props=dict(dxo.meta))


def _encrypted_weights(weights: dict) -> bool:
    return set(weights) == {DATA_KEY} and isinstance(weights[DATA_KEY], dict)


class SectionAggregatePersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` for the initial model; stores every summed global model as is.

    The sum is written to ``FL_global_model.sections`` in the run's app folder (:mod:`jobs.store`) after
    every round, with the round it closes: plaintext sums, or ciphertext the operator cannot read (with
    the fingerprint of the public context it was added under). A member reads it after the run. As each
    round's sum is stored, its sha256 and that of the records so far go to the run's ``digests.jsonl``
    (:mod:`jobs.published`). NVFlare 2.9 restores no interrupted job (its server snapshot is a
    no-op); a job that continues one starts from such a file instead: ``resume_from`` (a path at the
    server) is then the global model of its first round, sent as stored, encrypted or not.
    """

    # *args and **kwargs both: FLARE's job export then reads the parent's parameters too
    def __init__(self, *args, resume_from: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from
        self._he_fingerprint: str | None = None

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if not self.resume_from:
            return super().load_model(fl_ctx)
        stored = read_aggregate(self.resume_from)
        if stored.encrypted is not None:
            dxo = stored.encrypted.to_dxo()
            weights, meta = dict(dxo.data), dict(dxo.meta)
        else:
            weights, meta = stored.params, dict(stored.meta)
        self.log_info(fl_ctx, f"continuing from the aggregate of round {stored.round} stored at {self.resume_from}")
        return make_model_learnable(weights=weights, meta_props=meta)

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        if not is_sectioned(ml):
            super().save_model(ml, fl_ctx)
            return
        path = os.path.join(self.log_dir, GLOBAL_MODEL_FILE)
        weights, meta = ml[ModelLearnableKey.WEIGHTS], ml[ModelLearnableKey.META]
        round_ = meta.get(AppConstants.CURRENT_ROUND)
        if _encrypted_weights(weights):
            update = EncryptedUpdate.from_dxo(DXO(data_kind=ENCRYPTED_KIND, data=weights, meta=meta))
            fingerprint = self._fingerprint(fl_ctx)
            size = write_aggregate(path, meta=meta, encrypted=update, round_=round_, he_fingerprint=fingerprint)
        else:
            size = write_aggregate(path, meta=meta, params=weights, round_=round_)
        self.log_info(fl_ctx, f"stored the summed global model ({size / 1e6:.1f} MB) at {path}")
        self._record_digests(path, round_, fl_ctx)

    def _fingerprint(self, fl_ctx: FLContext) -> str:
        """The public context's fingerprint, from the server kit's ``startup/`` (the aggregator's context)."""
        if self._he_fingerprint is None:
            context = load_context_from_workspace(fl_ctx, SERVER_CONTEXT_FILE, private=False)
            self._he_fingerprint = public_fingerprint(context)
        return self._he_fingerprint

    def _record_digests(self, path: str, round_: int | None, fl_ctx: FLContext) -> None:
        """The round's receipt in ``digests.jsonl``: the stored aggregate's sha256 and the records' so far."""
        folder = run_folder(fl_ctx)
        if folder is None:
            self.log_warning(fl_ctx, "no job run folder in this context: the round's digests are not recorded")
            return
        stored = file_digest(path)
        with RECORDS_LOCK:
            receipt = {
                "kind": KIND_ROUND,
                "round": round_,
                "aggregate": os.path.relpath(path, folder),
                "aggregate_sha256": stored["sha256"],
                "aggregate_bytes": stored["bytes"],
                **records_digest(folder),
            }
            append_digest(folder, receipt)

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if model is not None and is_sectioned(model):
                return  # a sum of sections is not a PyTorch state dict to rank or re-save
        super().handle_event(event, fl_ctx)
