"""Member-side FLARE filters: encrypt the outgoing trunk, decrypt the incoming aggregate.

Both load the member's secret context from the site's ``startup/client_context.tenseal`` (written
there by the member key custodian, never by the operator).
"""

from __future__ import annotations

import time

import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from jobs.he.context import CLIENT_CONTEXT_FILE, WorkspaceContext
from jobs.he.payload import EncryptedUpdate, decrypt_average, encrypt_update, is_encrypted_dxo


def _dxo_or_none(shareable: Shareable) -> DXO | None:
    """The shareable's DXO, or None for replies that carry none (errors, empty results)."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return None
    try:
        return from_shareable(shareable)
    except ValueError:
        return None


class _MemberContextFilter(Filter):
    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT_FILE) -> None:
        super().__init__()
        self.tenseal_context_file = tenseal_context_file
        self._he = WorkspaceContext(tenseal_context_file, private=True)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self._he.on_event(event_type, fl_ctx)

    def _context_for(self, fl_ctx: FLContext) -> ts.Context:
        return self._he.get(fl_ctx)


class EncryptWeightedUpdate(_MemberContextFilter):
    """Task-result filter: ``w_i * trunk`` packed into CKKS ciphertexts, ``w_i`` in plaintext meta.

    Parameters
    ----------
    tenseal_context_file
        The member's secret context, in the site's ``startup/`` folder.
    weight_key
        DXO meta key holding the member's aggregation weight ``w_i`` (its local steps this round).
    """

    def __init__(
        self,
        tenseal_context_file: str = CLIENT_CONTEXT_FILE,
        weight_key: str = MetaKey.NUM_STEPS_CURRENT_ROUND,
    ) -> None:
        super().__init__(tenseal_context_file)
        self.weight_key = weight_key

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = _dxo_or_none(shareable)
        if dxo is None or dxo.data_kind == DataKind.METRICS or is_encrypted_dxo(dxo):
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(
                f"EncryptWeightedUpdate got a {dxo.data_kind} result; the client script must send "
                "FLModel(params=<trunk>, params_type=FULL) so members can average full weights"
            )
        weight = dxo.get_meta_prop(self.weight_key)
        if weight is None:
            raise ValueError(
                f"the result has no '{self.weight_key}' in its meta; send "
                f"FLModel(..., meta={{'{self.weight_key}': <local steps>}}) from the client script"
            )
        started = time.perf_counter()
        update = encrypt_update(self._context_for(fl_ctx), dxo.data, weight=float(weight))
        update.meta = dict(dxo.meta)
        update.to_dxo().update_shareable(shareable)
        self.log_info(
            fl_ctx,
            f"encrypted {update.layout.total} trunk values of {len(update.layout.names)} arrays into "
            f"{len(update.chunks)} CKKS chunks ({update.n_bytes / 1e6:.2f} MB) with weight {update.weight:g} "
            f"in {time.perf_counter() - started:.2f} s",
        )
        return shareable


class DecryptAggregate(_MemberContextFilter):
    """Task-data filter: decrypt ``sum w_i x_i`` from the server and divide by ``sum w_i``.

    A plaintext task (round 0's initial model, which the operator made) passes through untouched,
    so the client script always receives a plain ``FLModel`` with the trunk.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = _dxo_or_none(shareable)
        if dxo is None or not is_encrypted_dxo(dxo):
            return shareable
        started = time.perf_counter()
        update = EncryptedUpdate.from_dxo(dxo)
        params = decrypt_average(self._context_for(fl_ctx), update)
        DXO(data_kind=DataKind.WEIGHTS, data=params, meta=dict(update.meta)).update_shareable(shareable)
        self.log_info(
            fl_ctx,
            f"decrypted the aggregate of {update.contributors} members (total weight {update.weight:g}) "
            f"in {time.perf_counter() - started:.2f} s",
        )
        return shareable
