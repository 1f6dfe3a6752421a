"""Member-side FLARE filters: encrypt the outgoing sections, decrypt the incoming aggregate.

Both load the member's secret context from the site's ``startup/client_context.tenseal`` (written
there by the member key custodian, never by the operator). The client script stays HE-agnostic: it
sends sum-ready plaintext sections (:func:`jobs.sections.weighted_update`) and receives the summed
sections, which it finalizes itself.
"""

from __future__ import annotations

import time

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from jobs.he.context import WorkspaceContext
from jobs.he.masks import MaskRefused
from jobs.he.payload import (
    WIRE_BYTES_META,
    EncryptedUpdate,
    decrypt_update,
    dxo_or_none,
    encrypt_update,
    is_encrypted_dxo,
)
from jobs.member_masks import member_masks
from jobs.sections import sections_of
from jobs.secure_aggregation import refusal_reply
from schema.names import CLIENT_CONTEXT_FILE


class _MemberContextFilter(Filter):
    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT_FILE) -> None:
        super().__init__()
        self.tenseal_context_file = tenseal_context_file
        self._he = WorkspaceContext(tenseal_context_file, private=True)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self._he.on_event(event_type, fl_ctx)


class EncryptSections(_MemberContextFilter):
    """Task-result filter: every section of the site's sum-ready update packed into CKKS ciphertexts.

    The sections meta (weights, reductions) and the rest of the site's meta stay in plaintext. With
    ``secure_aggregation``, the member's :class:`jobs.member_masks.MemberMasks` encrypts and masks it.
    """

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT_FILE, secure_aggregation: bool = False) -> None:
        super().__init__(tenseal_context_file)
        self.secure_aggregation = bool(secure_aggregation)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = dxo_or_none(shareable)
        if dxo is None or dxo.data_kind == DataKind.METRICS or is_encrypted_dxo(dxo):
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS or not sections_of(dxo.meta):
            raise ValueError(
                f"EncryptSections got a {dxo.data_kind} result without sections meta; the client script must send "
                "FLModel(params=..., meta=...) built by jobs.sections.weighted_update"
            )
        started = time.perf_counter()
        if self.secure_aggregation:
            try:
                update = EncryptedUpdate.from_dxo(member_masks(fl_ctx).seal(dxo.data, dxo.meta, fl_ctx))
            except MaskRefused as exc:
                self.log_error(fl_ctx, f"MaskRefused: {exc}")
                return refusal_reply(str(exc))
        else:
            update = encrypt_update(self._he.get(fl_ctx), dxo.data, meta=dxo.meta)
        update.meta[WIRE_BYTES_META] = update.n_bytes
        update.to_dxo().update_shareable(shareable)
        self.log_info(
            fl_ctx,
            f"encrypted {len(update.sections)} sections into {update.n_bytes / 1e6:.2f} MB of CKKS ciphertext "
            f"in {time.perf_counter() - started:.2f} s",
        )
        return shareable


class DecryptAggregate(_MemberContextFilter):
    """Task-data filter: decrypt the summed sections from the server (still sum-ready values).

    A plaintext task (round 0's initial model, which the operator made) passes through untouched.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = dxo_or_none(shareable)
        if dxo is None or not is_encrypted_dxo(dxo):
            return shareable
        started = time.perf_counter()
        update = EncryptedUpdate.from_dxo(dxo)
        params = decrypt_update(self._he.get(fl_ctx), update)
        DXO(data_kind=DataKind.WEIGHTS, data=params, meta=dict(update.meta)).update_shareable(shareable)
        seconds = time.perf_counter() - started
        self.log_info(fl_ctx, f"decrypted {len(update.sections)} summed sections in {seconds:.2f} s")
        return shareable
