"""Secure aggregation without HE: fixed-point integers modulo 2^64 under the pairwise masks.

A member rounds each sum-ready value to ``round(x * 2^f)`` (two's complement in 64 bits), adds its mask
(:class:`jobs.he.masks.PairwiseMasker`, modulus 2^64) and sends the words; the server adds words modulo
2^64 (NumPy's uint64 wraps) and sees only uniform words for each member; the masks cancel in the sum,
which any member reads back as ``signed(sum) / 2^f``.

Quantization, stated: with ``f`` fractional bits, each value is off by at most ``2^-(f+1)`` (round to
nearest), so a sum of ``n`` members is off by at most ``n * 2^-(f+1)`` (:func:`error_bound`: 1.2e-10
per member at ``f = 32``). The sum must stay below ``2^(63-f)`` in absolute value (2.1e9 at ``f = 32``),
so one member's values must stay below ``2^(63-f) / MAX_CONTRIBUTORS`` (3.4e7 at ``f = 32`` and 64
members), which :func:`quantize` checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.he.mask_draws import MODULUS_2_64
from jobs.he.masks import MaskSource, RoundBinding, combined_mask

FRACTION_BITS = 32
MAX_CONTRIBUTORS = 64
"""As for CKKS (jobs.he.payload): a member's values leave room for the sum of this many members."""


def value_limit(*, fraction_bits: int = FRACTION_BITS, contributors: int = MAX_CONTRIBUTORS) -> float:
    """Largest |value| one member may send so that a sum of ``contributors`` members cannot wrap."""
    return float(2 ** (63 - fraction_bits)) / contributors


def error_bound(n_members: int, *, fraction_bits: int = FRACTION_BITS) -> float:
    """Largest error of a sum of ``n_members`` quantized values against the exact sum: ``n * 2^-(f+1)``."""
    return n_members * 2.0 ** -(fraction_bits + 1)


def quantize(values: np.ndarray, *, fraction_bits: int = FRACTION_BITS, name: str = "values") -> np.ndarray:
    """Float values as 64-bit words ``round(x * 2^f)`` modulo 2^64 (uint64)."""
    if not 0 <= fraction_bits <= 52:
        raise ValueError(f"fraction_bits={fraction_bits}; use 0 to 52 (a float64 holds 53 significant bits)")
    flat = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{name}: NaN or inf; training diverged, lower the learning rate")
    limit = value_limit(fraction_bits=fraction_bits)
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    if peak >= limit:
        raise ValueError(
            f"{name}: max |value| {peak:.3g} reaches {limit:.3g}, the share of the 64-bit range one of "
            f"{MAX_CONTRIBUTORS} members may use at {fraction_bits} fractional bits; use fewer fractional bits"
        )
    return np.rint(flat * 2.0**fraction_bits).astype(np.int64).view(np.uint64)


def dequantize(words: np.ndarray, *, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """A sum of quantized words (uint64, modulo 2^64) back as floats: the signed value over ``2^f``."""
    return np.asarray(words, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits


def mask_words(
    sources: Sequence[MaskSource],
    binding: RoundBinding,
    *,
    section: str,
    words: np.ndarray,
    subtract: bool = False,
    chunk_size: int = 1 << 16,
) -> np.ndarray:
    """``words`` (uint64) plus (``subtract``: minus) the sources' masks modulo 2^64, chunk by chunk of ``chunk_size``.

    A member adds its pairwise (and self) masks; the server takes the revealed self masks from its sum.
    """
    if not sources:
        raise ValueError("no mask source given; pass the member's PairwiseMasker (and SelfMask)")
    for source in sources:
        source.check(binding)
    words = np.asarray(words, dtype=np.uint64)
    out = np.empty_like(words)
    for index, start in enumerate(range(0, words.size, chunk_size)):
        part = words[start : start + chunk_size]
        mask = combined_mask(sources, binding, section=section, chunk=index, modulus=MODULUS_2_64, count=part.size)
        out[start : start + chunk_size] = part - mask if subtract else part + mask  # wraps modulo 2^64
    return out


def sum_words(contributions: list[np.ndarray]) -> np.ndarray:
    """The server's part: add the members' masked words modulo 2^64."""
    if not contributions:
        raise ValueError("no masked contribution to add")
    total = np.zeros_like(np.asarray(contributions[0], dtype=np.uint64))
    for words in contributions:
        if words.shape != total.shape:
            raise ValueError(f"masked words of shape {words.shape}, the sum has {total.shape}; the layouts differ")
        total += np.asarray(words, dtype=np.uint64)
    return total
