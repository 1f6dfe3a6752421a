"""The encrypted update on the wire, and the three operations on it: encrypt, add, decrypt.

An encrypted DXO (kind ``APP_DEFINED``, so no plaintext component mistakes it for weights)::

    data = {"ciphertexts": [bytes, ...]}          # CKKS chunks of sum_i w_i * x_i, no context inside
    meta = {"he_format": "consortium-ckks-packed/1",
            "he_layout": [[name, [dims]], ...],   # trunk names and shapes (public: the server has the model)
            "he_weight": float,                   # w_i, or sum_i w_i for an aggregate (plaintext)
            "he_contributors": int,
            "PROCESSED_ALGORITHM": "CKKS", ...}   # plus whatever meta the client sent (NUM_STEPS_...)

Pure TenSEAL + NumPy + DXO: no FLARE process needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey

from jobs.he.context import headroom
from jobs.he.packing import Layout, add_into, decrypt_flat, encrypt_flat, flatten, load_chunks, unflatten

HE_FORMAT = "consortium-ckks-packed/1"
HE_ALGORITHM = "CKKS"
ENCRYPTED_KIND = DataKind.APP_DEFINED
DATA_KEY = "ciphertexts"
META_FORMAT = "he_format"
META_LAYOUT = "he_layout"
META_WEIGHT = "he_weight"
META_CONTRIBUTORS = "he_contributors"
# A member's |w_i * x_i| may use this share of the sum's headroom: room for 64 equal contributions.
MAX_CONTRIBUTORS = 64


@dataclass
class EncryptedUpdate:
    """Ciphertext chunks of ``sum w_i x_i`` with the plaintext ``sum w_i`` and the layout."""

    chunks: list[bytes]
    layout: Layout
    weight: float
    contributors: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def n_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def to_dxo(self) -> DXO:
        meta = dict(self.meta)
        meta.update(
            {
                META_FORMAT: HE_FORMAT,
                META_LAYOUT: self.layout.to_meta(),
                META_WEIGHT: float(self.weight),
                META_CONTRIBUTORS: int(self.contributors),
                MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM,
            }
        )
        return DXO(data_kind=ENCRYPTED_KIND, data={DATA_KEY: list(self.chunks)}, meta=meta)

    @classmethod
    def from_dxo(cls, dxo: DXO) -> EncryptedUpdate:
        if not is_encrypted_dxo(dxo):
            raise ValueError(
                f"expected an encrypted trunk ({HE_FORMAT}), got a DXO of kind {dxo.data_kind} with meta "
                f"{sorted(dxo.meta or {})}; is EncryptWeightedUpdate installed as the client's result filter?"
            )
        chunks = dxo.data.get(DATA_KEY)
        if not isinstance(chunks, list) or not chunks:
            raise ValueError(f"encrypted DXO carries no ciphertext list under '{DATA_KEY}'")
        weight = float(dxo.get_meta_prop(META_WEIGHT, 0.0))
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"encrypted DXO has aggregation weight {weight}; it must be a positive number")
        meta = {k: v for k, v in dxo.meta.items() if k not in _OWN_META}
        return cls(
            chunks=chunks,
            layout=Layout.from_meta(dxo.get_meta_prop(META_LAYOUT)),
            weight=weight,
            contributors=int(dxo.get_meta_prop(META_CONTRIBUTORS, 1)),
            meta=meta,
        )


_OWN_META = {META_FORMAT, META_LAYOUT, META_WEIGHT, META_CONTRIBUTORS, MetaKey.PROCESSED_ALGORITHM}


def is_encrypted_dxo(dxo: DXO) -> bool:
    """True for a DXO in our packed CKKS format (by kind, format tag and ciphertext bytes)."""
    if dxo.data_kind != ENCRYPTED_KIND or dxo.get_meta_prop(META_FORMAT) != HE_FORMAT:
        return False
    chunks = dxo.data.get(DATA_KEY) if isinstance(dxo.data, dict) else None
    if not isinstance(chunks, list) or set(dxo.data) != {DATA_KEY}:
        return False
    return all(isinstance(c, (bytes, bytearray)) for c in chunks)


def encrypt_update(context: ts.Context, params: Mapping[str, np.ndarray], *, weight: float) -> EncryptedUpdate:
    """Multiply the flattened ``params`` by ``weight`` in plaintext, then encrypt it packed.

    Raises
    ------
    ValueError
        ``weight`` is not positive, or ``|weight * x|`` would leave too little headroom for the sum of
        :data:`MAX_CONTRIBUTORS` members under the context's modulus (the sum would wrap around).
    """
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"aggregation weight {weight}; NUM_STEPS_CURRENT_ROUND must be a positive number")
    flat, layout = flatten(params)
    weighted = flat * float(weight)
    limit = headroom(context) / MAX_CONTRIBUTORS
    peak = float(np.max(np.abs(weighted))) if weighted.size else 0.0
    if peak >= limit:
        raise ValueError(
            f"weight {weight} x max |parameter| {peak / weight:.3g} = {peak:.3g} exceeds {limit:.3g}, the share of "
            f"the CKKS headroom one of {MAX_CONTRIBUTORS} members may use; send a smaller "
            "NUM_STEPS_CURRENT_ROUND (e.g. epochs instead of steps) or give privacy.he a larger first prime"
        )
    return EncryptedUpdate(chunks=encrypt_flat(context, weighted), layout=layout, weight=float(weight))


class CiphertextSum:
    """Running sum of encrypted updates under a (public) context: additions only."""

    def __init__(self, context: ts.Context) -> None:
        self.context = context
        self.layout: Layout | None = None
        self.weight = 0.0
        self.contributors = 0
        self._total: list[ts.CKKSVector] | None = None

    def add(self, update: EncryptedUpdate) -> None:
        if self.layout is not None and update.layout != self.layout:
            raise ValueError(
                f"update layout {update.layout.names[:3]}... differs from the first contribution's "
                f"{self.layout.names[:3]}...; every member must send the same trunk keys"
            )
        self._total = add_into(self._total, load_chunks(self.context, update.chunks))
        self.layout = update.layout
        self.weight += update.weight
        self.contributors += update.contributors

    def result(self) -> EncryptedUpdate:
        if self._total is None or self.layout is None:
            raise ValueError("no encrypted contribution was accepted this round; nothing to aggregate")
        return EncryptedUpdate(
            chunks=[vector.serialize() for vector in self._total],
            layout=self.layout,
            weight=self.weight,
            contributors=self.contributors,
        )


def decrypt_average(context: ts.Context, update: EncryptedUpdate) -> dict[str, np.ndarray]:
    """Decrypt ``sum w_i x_i`` with a member's secret context and divide by ``sum w_i`` in plaintext."""
    flat = decrypt_flat(context, update.chunks, n_values=update.layout.total)
    return unflatten(flat / update.weight, update.layout)
