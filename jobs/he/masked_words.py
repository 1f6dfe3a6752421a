"""Secure aggregation without HE on the wire: each section as masked fixed-point words modulo 2^64.

A masked DXO (kind ``APP_DEFINED``, so no plaintext component mistakes it for weights)::

    data = {"masked_words": {section: uint64 array}}        # quantized, flattened, masked (jobs.he.fixed_point)
    meta = {"masked_format": "consortium-masked-words/1",
            "masked_layout": {section: [[key, [dims]], ...]},
            "masked_fraction_bits": 32,
            "consortium_sections": {...}, ...}                # plaintext, as for HE (jobs.he.payload)

The server adds the words modulo 2^64 (:class:`WordSum`), takes the revealed self masks off, and reads
the sum as floats: what it sees of one member alone is uniform words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from nvflare.apis.dxo import DXO, DataKind

from jobs.he.fixed_point import FRACTION_BITS, dequantize, mask_words, quantize
from jobs.he.masks import MaskSource, RoundBinding
from jobs.he.packing import Layout, flatten, unflatten
from jobs.sections import SECTIONS_META, Section, add_sections, described_sections, sections_of

MASKED_FORMAT = "consortium-masked-words/1"
MASKED_KIND = DataKind.APP_DEFINED
WORDS_KEY = "masked_words"
META_FORMAT = "masked_format"
META_LAYOUT = "masked_layout"
META_FRACTION_BITS = "masked_fraction_bits"
_OWN_META = {META_FORMAT, META_LAYOUT, META_FRACTION_BITS}


def is_masked_dxo(dxo: DXO) -> bool:
    """True for a DXO in the masked-words format (kind, format tag and a dict of arrays)."""
    if dxo.data_kind != MASKED_KIND or (dxo.meta or {}).get(META_FORMAT) != MASKED_FORMAT:
        return False
    words = (dxo.data or {}).get(WORDS_KEY)
    return isinstance(words, dict) and all(isinstance(w, np.ndarray) for w in words.values())


def mask_update(
    params: Mapping[str, np.ndarray],
    *,
    meta: Mapping,
    sources: Mapping[str, Sequence[MaskSource]],
    binding: RoundBinding,
) -> DXO:
    """A member's sum-ready sections (:func:`jobs.sections.weighted_update`) as masked words; ``sources``
    holds each section's mask sources (its holders' pairwise masks and the member's self mask)."""
    described = described_sections(params, meta, action="mask")
    words, layouts = {}, {}
    for name, section in described.items():
        flat, layout = flatten({k: params[k] for k in section.keys})
        quantized = quantize(flat, fraction_bits=FRACTION_BITS, name=f"section '{name}'")
        words[name] = mask_words(sources[name], binding, section=name, words=quantized)
        layouts[name] = layout.to_meta()
    full_meta = {**dict(meta), META_FORMAT: MASKED_FORMAT, META_LAYOUT: layouts, META_FRACTION_BITS: FRACTION_BITS}
    return DXO(data_kind=MASKED_KIND, data={WORDS_KEY: words}, meta=full_meta)


class WordSum:
    """The operator's running sum of masked words, section by section (additions modulo 2^64 only)."""

    def __init__(self) -> None:
        self._sections: dict[str, Section] | None = None
        self._layouts: dict[str, Layout] = {}
        self._totals: dict[str, np.ndarray] = {}

    def add(self, dxo: DXO) -> None:
        if not is_masked_dxo(dxo):
            raise ValueError(f"expected masked words ({MASKED_FORMAT}), got a DXO of kind {dxo.data_kind}")
        if dxo.meta.get(META_FRACTION_BITS) != FRACTION_BITS:
            raise ValueError(f"masked words at {dxo.meta.get(META_FRACTION_BITS)} fraction bits, not {FRACTION_BITS}")
        described = sections_of(dxo.meta)
        sections = add_sections(self._sections, described)  # checks the sections agree before any sum changes
        words = dxo.data[WORDS_KEY]
        layouts = {name: Layout.from_meta(entry) for name, entry in (dxo.meta.get(META_LAYOUT) or {}).items()}
        if set(words) != set(described) or set(layouts) != set(described):
            raise ValueError(
                f"masked words for {sorted(words)}, layouts {sorted(layouts)}, sections {sorted(described)}"
            )
        for name, part in words.items():
            if part.dtype != np.uint64 or part.ndim != 1 or part.size != layouts[name].total:
                raise ValueError(f"section '{name}': {part.dtype} x {part.shape}, expected {layouts[name].total} words")
            if name in self._layouts and layouts[name] != self._layouts[name]:
                raise ValueError(f"section '{name}': layout differs from the first contribution's")
        for name, part in words.items():
            total = self._totals.get(name)
            self._totals[name] = part.copy() if total is None else total + part  # uint64 wraps modulo 2^64
            self._layouts[name] = layouts[name]
        self._sections = sections

    def sections_sent(self) -> list[str]:
        return sorted(self._totals)

    def result(self, *, unmask: Mapping[str, Sequence[MaskSource]], binding: RoundBinding) -> DXO:
        """The sum as a plaintext WEIGHTS DXO, each section's revealed self masks ``unmask`` taken off first."""
        if not self._sections:
            raise ValueError("no masked contribution was accepted this round; nothing to aggregate")
        params: dict[str, np.ndarray] = {}
        for name, total in self._totals.items():
            sources = unmask.get(name) or []
            words = mask_words(sources, binding, section=name, words=total, subtract=True) if sources else total
            flat = dequantize(words, fraction_bits=FRACTION_BITS)
            params.update(unflatten(flat, self._layouts[name], dtype=np.float64))
        meta = {SECTIONS_META: {n: s.to_meta() for n, s in self._sections.items()}}
        return DXO(data_kind=DataKind.WEIGHTS, data=params, meta=meta)


def strip_meta(meta: Mapping) -> dict:
    """A masked DXO's meta without this format's own keys."""
    return {k: v for k, v in meta.items() if k not in _OWN_META}
