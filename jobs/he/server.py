"""Operator-side FLARE components: add ciphertexts, forward and store the encrypted aggregate.

The server holds only ``server_context.tenseal`` (no secret key; loading refuses one with a secret
key). Nothing here multiplies or divides a ciphertext, so a single CKKS data prime suffices.
"""

from __future__ import annotations

import os
import threading
import time

import tenseal as ts
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from jobs.he.context import SERVER_CONTEXT_FILE, WorkspaceContext
from jobs.he.payload import (
    DATA_KEY,
    ENCRYPTED_KIND,
    HE_FORMAT,
    META_FORMAT,
    CiphertextSum,
    EncryptedUpdate,
    is_encrypted_dxo,
)
from jobs.he.store import write_encrypted_aggregate

ENCRYPTED_MODEL_FILE = "FL_global_model.ckks"


def _is_encrypted_learnable(model: ModelLearnable) -> bool:
    meta = model.get(ModelLearnableKey.META) or {}
    return meta.get(META_FORMAT) == HE_FORMAT


class CiphertextSumAggregator(Aggregator):
    """Sums the members' encrypted ``w_i x_i`` and their plaintext ``w_i``; never decrypts.

    Parameters
    ----------
    tenseal_context_file
        The operator's public context in the server kit's ``startup/`` folder.
    """

    def __init__(self, tenseal_context_file: str = SERVER_CONTEXT_FILE) -> None:
        super().__init__()
        self.tenseal_context_file = tenseal_context_file
        self._he = WorkspaceContext(tenseal_context_file, private=False)
        self._sum: CiphertextSum | None = None
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self._he.on_event(event_type, fl_ctx)

    def _context_for(self, fl_ctx: FLContext) -> ts.Context:
        return self._he.get(fl_ctx)

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
            update = EncryptedUpdate.from_dxo(from_shareable(shareable))
        except ValueError as exc:
            self.log_error(fl_ctx, f"refusing {contributor}'s result: {exc}")
            return False
        with self._lock:
            if contributor in self._seen:
                self.log_warning(fl_ctx, f"{contributor} already contributed to round {current_round}")
                return False
            if self._sum is None:
                self._sum = CiphertextSum(self._context_for(fl_ctx))
            started = time.perf_counter()
            try:
                self._sum.add(update)
            except (ValueError, TypeError) as exc:
                self.log_error(fl_ctx, f"refusing {contributor}'s result: {exc}")
                return False
            self._seen.add(contributor)
        self.log_info(
            fl_ctx,
            f"added {contributor}'s {len(update.chunks)} ciphertexts (weight {update.weight:g}) "
            f"in {time.perf_counter() - started:.2f} s",
        )
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        with self._lock:
            if self._sum is None:
                raise RuntimeError("no member sent an encrypted trunk this round; check the members' logs")
            result = self._sum.result()
        result.meta = {AppConstants.CURRENT_ROUND: fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}
        self.log_info(fl_ctx, f"encrypted aggregate of {result.contributors} members, total weight {result.weight:g}")
        return result.to_dxo().to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        with self._lock:
            self._sum = None
            self._seen = set()


class EncryptedAggregateShareableGenerator(ShareableGenerator):
    """Sends the global model as it is: plaintext in round 0, the encrypted aggregate afterwards.

    Unlike NVFlare's ``HEModelShareableGenerator`` it needs no context at all: the aggregate is
    the new global model (members divide by the weight sum), so nothing is added on the server.
    """

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        weights = model.get(ModelLearnableKey.WEIGHTS) or {}
        meta = dict(model.get(ModelLearnableKey.META) or {})
        if _is_encrypted_learnable(model):
            return DXO(data_kind=ENCRYPTED_KIND, data=weights, meta=meta).to_shareable()
        from nvflare.app_common.abstract.model import model_learnable_to_dxo

        return model_learnable_to_dxo(model).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        if not is_encrypted_dxo(dxo):
            raise ValueError(
                f"the aggregate is a {dxo.data_kind} DXO, not an encrypted trunk; the HE job needs "
                "CiphertextSumAggregator as its aggregator"
            )
        return make_model_learnable(weights={DATA_KEY: dxo.data[DATA_KEY]}, meta_props=dict(dxo.meta))


class EncryptedAggregatePersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` for the initial (plaintext) trunk; stores encrypted aggregates as is.

    An encrypted global model is written to ``FL_global_model.ckks`` in the run's app folder (see
    :mod:`jobs.he.store`); a member decrypts it with :func:`jobs.he.store.decrypt_aggregate_file`.
    """

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        if not _is_encrypted_learnable(ml):
            super().save_model(ml, fl_ctx)
            return
        path = os.path.join(self.log_dir, ENCRYPTED_MODEL_FILE)
        update = EncryptedUpdate.from_dxo(
            DXO(data_kind=ENCRYPTED_KIND, data=ml[ModelLearnableKey.WEIGHTS], meta=ml[ModelLearnableKey.META])
        )
        write_encrypted_aggregate(path, update)
        self.log_info(fl_ctx, f"stored the encrypted aggregate ({update.n_bytes / 1e6:.1f} MB) at {path}")

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if model is not None and _is_encrypted_learnable(model):
                return  # the server cannot rank or re-save an encrypted model
        super().handle_event(event, fl_ctx)
