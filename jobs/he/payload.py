"""The encrypted update on the wire, and the three operations on it: encrypt, add, decrypt.

An encrypted DXO (kind ``APP_DEFINED``, so no plaintext component mistakes it for weights)::

    data = {"ciphertexts": {section: [bytes, ...]}}   # seeded CKKS chunks, N values each (jobs.he.packing)
    meta = {"he_format": "consortium-ckks-sections/2",
            "he_layout": {section: [[key, [dims]], ...]},   # names and shapes (public: the model is)
            "consortium_sections": {section: {keys, weight, reduce, contributors}},   # plaintext
            "PROCESSED_ALGORITHM": "CKKS", ...}               # plus the rest of the site's meta

The values were made sum-ready by :func:`jobs.sections.weighted_update`, so encryption here only packs
them; the server only adds; a member decrypts and calls :func:`jobs.sections.finalize`.
Pure TenSEAL + NumPy + DXO: no FLARE process needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from tenseal import sealapi

from jobs.he.context import headroom
from jobs.he.packing import (
    Layout,
    add_into,
    chunk_capacity,
    decrypt_flat,
    encrypt_flat,
    flatten,
    load_chunks,
    serialize_chunks,
    slot_peak,
    unflatten,
)
from jobs.sections import SECTIONS_META, Section, add_sections, described_sections, sections_of

HE_FORMAT = "consortium-ckks-sections/2"  # /2: symmetric seeded ciphertexts, two values per slot
HE_ALGORITHM = "CKKS"
ENCRYPTED_KIND = DataKind.APP_DEFINED
DATA_KEY = "ciphertexts"
META_FORMAT = "he_format"
META_LAYOUT = "he_layout"
# A member's values may use this share of the sum's headroom: room for 64 equal contributions.
MAX_CONTRIBUTORS = 64
_OWN_META = {META_FORMAT, META_LAYOUT, MetaKey.PROCESSED_ALGORITHM}


WIRE_BYTES_META = "consortium_wire_bytes"


def dxo_or_none(shareable: Shareable) -> DXO | None:
    """The shareable's DXO, or None for replies that carry none (errors, empty results)."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return None
    try:
        return from_shareable(shareable)
    except ValueError:
        return None


@dataclass
class EncryptedSection:
    chunks: list[bytes]
    layout: Layout


@dataclass
class EncryptedUpdate:
    """Per section, the ciphertext chunks of its sum-ready values; the plaintext sections meta."""

    sections: dict[str, EncryptedSection]
    meta: dict = field(default_factory=dict)

    @property
    def n_bytes(self) -> int:
        return sum(len(c) for s in self.sections.values() for c in s.chunks)

    @property
    def described(self) -> dict[str, Section]:
        return sections_of(self.meta)

    def to_dxo(self) -> DXO:
        meta = dict(self.meta)
        meta.update(
            {
                META_FORMAT: HE_FORMAT,
                META_LAYOUT: {name: s.layout.to_meta() for name, s in self.sections.items()},
                MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM,
            }
        )
        data = {DATA_KEY: {name: list(s.chunks) for name, s in self.sections.items()}}
        return DXO(data_kind=ENCRYPTED_KIND, data=data, meta=meta)

    @classmethod
    def from_dxo(cls, dxo: DXO) -> EncryptedUpdate:
        if not is_encrypted_dxo(dxo):
            raise ValueError(
                f"expected an encrypted update ({HE_FORMAT}), got a DXO of kind {dxo.data_kind} with meta "
                f"{sorted(dxo.meta or {})}; is EncryptSections installed as the client's result filter?"
            )
        layouts = dxo.get_meta_prop(META_LAYOUT) or {}
        chunks = dxo.data[DATA_KEY]
        if set(layouts) != set(chunks):
            raise ValueError(f"encrypted DXO: sections {sorted(chunks)} but layouts for {sorted(layouts)}")
        meta = {k: v for k, v in dxo.meta.items() if k not in _OWN_META}
        update = cls(
            sections={name: EncryptedSection(list(chunks[name]), Layout.from_meta(layouts[name])) for name in chunks},
            meta=meta,
        )
        described = update.described
        if set(described) != set(update.sections):
            raise ValueError(f"encrypted DXO: ciphertexts for {sorted(update.sections)}, meta for {sorted(described)}")
        return update


def is_encrypted_dxo(dxo: DXO) -> bool:
    """True for a DXO in our sectioned CKKS format (by kind, format tag and ciphertext bytes)."""
    if dxo.data_kind != ENCRYPTED_KIND or dxo.get_meta_prop(META_FORMAT) != HE_FORMAT:
        return False
    if not isinstance(dxo.data, dict) or set(dxo.data) != {DATA_KEY} or not isinstance(dxo.data[DATA_KEY], dict):
        return False
    chunks = dxo.data[DATA_KEY].values()
    return all(isinstance(c, list) and c and all(isinstance(b, (bytes, bytearray)) for b in c) for c in chunks)


def encrypt_update(context: ts.Context, params: Mapping[str, np.ndarray], *, meta: Mapping) -> EncryptedUpdate:
    """Pack and encrypt each section of a sum-ready update (:func:`jobs.sections.weighted_update`).

    Raises
    ------
    ValueError
        A key lies in no section of ``meta``, or a value would leave too little headroom for the sum of
        :data:`MAX_CONTRIBUTORS` members under the context's modulus (the sum would wrap around).
    """
    described = described_sections(params, meta, action="encrypt")
    limit = headroom(context) / MAX_CONTRIBUTORS
    capacity = chunk_capacity(context)
    sections = {}
    for name, section in described.items():
        flat, layout = flatten({k: params[k] for k in section.keys})
        peak = slot_peak(flat, capacity=capacity)  # |re + i im| of a slot bounds the plaintext's coefficients
        if peak >= limit:
            raise ValueError(
                f"section '{name}': max |value| {peak:.3g} (a slot's |re + i im|: it holds two values) exceeds "
                f"{limit:.3g}, the share of the CKKS headroom one of {MAX_CONTRIBUTORS} members may use; give "
                "privacy.he a larger first prime"
            )
        sections[name] = EncryptedSection(encrypt_flat(context, flat), layout)
    return EncryptedUpdate(sections=sections, meta=dict(meta))


class CiphertextSum:
    """Running sum of encrypted updates under a (public) context, section by section: additions only."""

    def __init__(self, context: ts.Context) -> None:
        self.context = context
        self._sections: dict[str, Section] | None = None
        self._layouts: dict[str, Layout] = {}
        self._totals: dict[str, list[sealapi.Ciphertext]] = {}

    def add(self, update: EncryptedUpdate) -> None:
        sections = add_sections(self._sections, update.described)  # checks keys agree, before touching sums
        for name, part in update.sections.items():
            if name in self._layouts and part.layout != self._layouts[name]:
                raise ValueError(f"section '{name}': layout differs from the first contribution's")
        # load every section first: a damaged chunk anywhere is refused before any sum changes
        loaded = {name: load_chunks(self.context, part.chunks) for name, part in update.sections.items()}
        for name, vectors in loaded.items():
            if name in self._totals and len(vectors) != len(self._totals[name]):
                raise ValueError(
                    f"section '{name}': {len(vectors)} ciphertext chunks, the sum has {len(self._totals[name])}"
                )
        for name, vectors in loaded.items():
            self._totals[name] = add_into(self.context, self._totals.get(name), vectors)
            self._layouts[name] = update.sections[name].layout
        self._sections = sections

    def result(self) -> EncryptedUpdate:
        if not self._sections:
            raise ValueError("no encrypted contribution was accepted this round; nothing to aggregate")
        return EncryptedUpdate(
            sections={n: EncryptedSection(serialize_chunks(t), self._layouts[n]) for n, t in self._totals.items()},
            meta={SECTIONS_META: {n: s.to_meta() for n, s in self._sections.items()}},
        )


def decrypt_update(context: ts.Context, update: EncryptedUpdate) -> dict[str, np.ndarray]:
    """Decrypt every section with a member's secret context: the sum-ready values (float64)."""
    params: dict[str, np.ndarray] = {}
    for part in update.sections.values():
        flat = decrypt_flat(context, part.chunks, n_values=part.layout.total)
        params.update(unflatten(flat, part.layout, dtype=np.float64))
    return params
