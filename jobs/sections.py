"""What a site sends and what the server returns: named sections of one flat parameter dictionary.

A site's update is one ``FLModel.params`` dictionary whose keys fall into sections:

========================  ===========  ==========================================================
key prefix                section      aggregated as
========================  ===========  ==========================================================
``trunk.``                ``trunk``    mean over all members, weighted by local steps
``heads.<endpoint>.``     ``head:<e>`` mean over the members holding that shared endpoint
``stats.<endpoint>.``     ``stats:<e>`` sum: per-feature sufficient statistics (``omics.association``)
``consensus.<endpoint>.`` ``consensus:<e>`` sum: normalized attribution vectors of the endpoint
``coxfit.<endpoint>.``    ``coxfit:<e>`` sum: one Newton step of the covariates' Cox model (``omics.cox``)
``scaling.<part>.``       ``scaling:<p>`` sum: n, sums, sums of squares of the features and shared regression targets
``feasibility.<name>.``   ``feasibility:<n>`` sum: a protocol's count vector (``omics.feasibility``)
========================  ===========  ==========================================================

The site multiplies a mean section by its weight before sending and puts the weight in the meta, so
the server only ever **adds**: arrays in plaintext, ciphertexts under HE. Whoever holds the sum
(a member after decryption, or anyone in a plaintext run) calls :func:`finalize` to divide the mean
sections by their summed weights. Sum sections are divided by their kind's :data:`SUM_SCALES` on the
way and multiplied back in :func:`finalize`: statistics shrink (sums of squares over thousands of
samples would otherwise outgrow the CKKS headroom), attribution vectors grow (``sum |score| = 1`` over
the panel, so an entry is about ``1 / p``, which CKKS noise of ~1e-8 would drown). In plaintext the
round trip is exact to float64 rounding.

NumPy only (the key prefixes come from the network): the HE filters, the server's aggregator, the site
and the release step all call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.network import HEAD_PREFIX, TRUNK_PREFIX

SECTIONS_META = "consortium_sections"
PUBLISHED_META = "consortium_published"
MEAN, SUM = "mean", "sum"
SUM_SCALES = {"stats": 1e4, "consensus": 1e-3, "coxfit": 1e4, "scaling": 1e4, "feasibility": 1e2}
"""Divisor of each kind of sum section on the way to the server (undone by :func:`finalize`)."""
_PREFIXES = {
    TRUNK_PREFIX: ("trunk", MEAN),
    HEAD_PREFIX: ("head", MEAN),
    "stats.": ("stats", SUM),
    "consensus.": ("consensus", SUM),
    "coxfit.": ("coxfit", SUM),
    "scaling.": ("scaling", SUM),
    "feasibility.": ("feasibility", SUM),
}


@dataclass(frozen=True)
class Section:
    """One section of an update or aggregate: its keys, summed weight, reduction and contributor count."""

    name: str
    keys: tuple[str, ...]
    weight: float
    reduce: str
    contributors: int = 1

    def to_meta(self) -> dict:
        return {
            "keys": list(self.keys),
            "weight": float(self.weight),
            "reduce": self.reduce,
            "contributors": int(self.contributors),
        }

    @classmethod
    def from_meta(cls, name: str, meta: Mapping) -> Section:
        reduce = meta.get("reduce")
        if reduce not in (MEAN, SUM):
            raise ValueError(f"section '{name}': reduce={reduce!r}; expected '{MEAN}' or '{SUM}'")
        weight = float(meta.get("weight", 0.0))
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"section '{name}': weight {weight}; it must be a positive number")
        return cls(name, tuple(str(k) for k in meta["keys"]), weight, reduce, int(meta.get("contributors", 1)))


def section_of(key: str) -> tuple[str, str]:
    """``(section name, reduction)`` of a parameter key; a key outside the known prefixes is refused."""
    for prefix, (kind, reduce) in _PREFIXES.items():
        if key.startswith(prefix):
            if kind == "trunk":
                return "trunk", reduce
            endpoint = key[len(prefix) :].split(".", 1)[0]
            return f"{kind}:{endpoint}", reduce
    raise ValueError(f"key '{key}' belongs to no section; only {sorted(_PREFIXES)} keys may leave a site")


def weighted_update(params: Mapping[str, np.ndarray], *, weights: Mapping[str, float]) -> tuple[dict, dict]:
    """The sum-ready form of a site's update and its sections meta.

    Parameters
    ----------
    params
        Plain values, keyed as in the table of the module docstring.
    weights
        Weight of each mean section (``"trunk"``, ``"head:<endpoint>"``): the site's local steps. Sum
        sections take weight 1.

    Returns
    -------
    tuple
        ``(params, meta)``: mean sections multiplied by their weight, sum sections divided by
        their kind's :data:`SUM_SCALES`, all float64; ``meta`` is ``{SECTIONS_META: {name: section meta}}``.
    """
    grouped: dict[str, list[str]] = {}
    reductions: dict[str, str] = {}
    for key in params:
        name, reduce = section_of(key)
        grouped.setdefault(name, []).append(key)
        reductions[name] = reduce
    out: dict[str, np.ndarray] = {}
    sections: dict[str, dict] = {}
    for name, keys in grouped.items():
        if reductions[name] == MEAN:
            if name not in weights:
                raise ValueError(f"no weight for mean section '{name}'; give the site's local steps for it")
            weight = float(weights[name])
            factor = weight
        else:
            weight, factor = 1.0, 1.0 / _sum_scale(name)
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"section '{name}': weight {weight}; it must be a positive number of local steps")
        for key in keys:
            value = np.asarray(params[key], dtype=np.float64)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"'{key}' holds NaN or inf; training diverged or a statistic is undefined")
            out[key] = value * factor
        sections[name] = Section(name, tuple(keys), weight, reductions[name]).to_meta()
    return out, {SECTIONS_META: sections}


def sections_of(meta: Mapping | None) -> dict[str, Section]:
    """The sections described in a meta dictionary (``{}`` for a plain model, e.g. round 0's)."""
    described = (meta or {}).get(SECTIONS_META) or {}
    return {name: Section.from_meta(name, value) for name, value in described.items()}


def described_sections(params: Mapping[str, np.ndarray], meta: Mapping | None, *, action: str) -> dict[str, Section]:
    """The sections of an outgoing update, checked to cover every key of ``params`` (``action``: what the
    caller refuses to do with a partial update, e.g. ``"encrypt"``)."""
    described = sections_of(meta)
    if not described:
        raise ValueError(f"the update has no '{SECTIONS_META}' meta; send it through jobs.sections.weighted_update")
    covered = {k for s in described.values() for k in s.keys}
    stray = sorted(set(params) - covered)
    if stray:
        raise ValueError(f"keys {stray[:5]} belong to no described section; refusing to {action} a partial update")
    return described


def add_sections(total: dict[str, Section] | None, update: Mapping[str, Section]) -> dict[str, Section]:
    """Sum the weights and contributors of ``update`` into ``total`` (the server's bookkeeping)."""
    total = dict(total or {})
    for name, section in update.items():
        if name not in total:
            total[name] = section
            continue
        known = total[name]
        if known.keys != section.keys or known.reduce != section.reduce:
            raise ValueError(
                f"section '{name}' arrives with other keys or reduction than before; every holder of an "
                "endpoint must send the same shapes (same panel, same network widths)"
            )
        total[name] = Section(
            name, known.keys, known.weight + section.weight, known.reduce, known.contributors + section.contributors
        )
    return total


def finalize(params: Mapping[str, np.ndarray], meta: Mapping | None) -> dict[str, np.ndarray]:
    """Plain values from a summed aggregate: mean sections divided by their weight, sums rescaled.

    A model without sections meta (the server's initial model) is returned unchanged.
    """
    sections = sections_of(meta)
    if not sections:
        return {k: np.asarray(v) for k, v in params.items()}
    out: dict[str, np.ndarray] = {}
    for section in sections.values():
        factor = 1.0 / section.weight if section.reduce == MEAN else _sum_scale(section.name)
        for key in section.keys:
            if key not in params:
                raise ValueError(f"section '{section.name}' names '{key}', which the aggregate does not hold")
            out[key] = np.asarray(params[key], dtype=np.float64) * factor
    return out


def _sum_scale(name: str) -> float:
    """The :data:`SUM_SCALES` entry of a sum section (``stats:<e>`` or ``consensus:<e>``)."""
    kind = name.split(":", 1)[0]
    if kind not in SUM_SCALES:
        raise ValueError(f"sum section '{name}': unknown kind '{kind}'; sum sections are {sorted(SUM_SCALES)}")
    return SUM_SCALES[kind]


def select(params: Mapping[str, np.ndarray], kind: str) -> dict[str, dict[str, np.ndarray]]:
    """Per endpoint, the arrays of the ``stats`` or ``consensus`` sections, keyed by their last part."""
    prefix = f"{kind}."
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in params.items():
        if key.startswith(prefix):
            endpoint, name = key[len(prefix) :].split(".", 1)
            found.setdefault(endpoint, {})[name] = np.asarray(value)
    return found
