"""What a mask is made of: values drawn without bias below a modulus from an AES-256-CTR keystream, and
their sums modulo it (:mod:`jobs.he.masks` keys the streams and binds them to a round).

Nothing here is a hand-written primitive: AES-CTR comes from ``cryptography``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODULUS_2_64 = 1 << 64


_ZEROS = b""  # the plaintext the keystream is read through (grown to the largest draw; bytes: never written)


def _keystream_words(key: bytes, n_words: int, state: list) -> np.ndarray:
    """The next ``n_words`` little-endian 64-bit words of the AES-256-CTR keystream under ``key`` (``state``
    carries the stream from one call to the next), as a new writable uint64 array.

    The zeros it encrypts are made once, not per draw, and the cipher writes into the array itself: a
    fresh zero buffer and a copy per draw cost five times the encryption.
    """
    global _ZEROS
    if not state:
        state.append(Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor())
    n_bytes = 8 * n_words
    if len(_ZEROS) < n_bytes:
        _ZEROS = bytes(n_bytes)
    out = np.empty(n_bytes + 15, dtype=np.uint8)  # update_into asks for a block's slack
    state[0].update_into(memoryview(_ZEROS)[:n_bytes], out)
    return out[:n_bytes].view("<u8").astype(np.uint64, copy=False)


def draw_below(key: bytes, modulus: int, count: int) -> np.ndarray:
    """``count`` values uniform in ``[0, modulus)`` from AES-256-CTR under ``key`` (uint64).

    Each 64-bit keystream word is cut to the modulus' bit length and kept only if below the modulus
    (rejection sampling: no modular bias); at least half the words are kept. ``modulus`` 2^64 keeps every word.
    """
    if not 2 <= modulus <= MODULUS_2_64:
        raise ValueError(f"modulus {modulus}: masks are drawn below a modulus in [2, 2^64]")
    state: list = []
    if modulus == MODULUS_2_64:
        return _keystream_words(key, count, state)
    bits = int(modulus - 1).bit_length()
    cut, bound = np.uint64((1 << bits) - 1), np.uint64(modulus)
    kept: list[np.ndarray] = []
    have = 0
    while have < count:
        need = count - have
        words = int(need * (1 << bits) / modulus * 1.01) + 16
        draws = _keystream_words(key, words, state)
        draws &= cut
        if draws.size and draws.max() >= bound:  # CKKS primes lie just under a power of two: rarely taken
            draws = draws[draws < bound]
        kept.append(draws[:need])
        have += kept[-1].size
    return kept[0] if len(kept) == 1 else np.concatenate(kept)


class ModularSum:
    """A sum of arrays of values below ``modulus``, modulo ``modulus`` (uint64), reduced lazily.

    Terms are added as they are (``negative`` ones into a second sum) and a sum is reduced only when one
    more term could pass 2^64: at 60-bit primes, once every 16 terms. Modulo 2^64 the uint64 arithmetic
    wraps by itself. The result is exactly that of reducing after every term.

    >>> total = ModularSum(3, 7)
    >>> total.add(np.array([6, 5, 0], dtype=np.uint64)); total.add(np.array([3, 1, 0], dtype=np.uint64), negative=True)
    >>> total.result().tolist()
    [3, 4, 0]
    """

    def __init__(self, count: int, modulus: int) -> None:
        self.count, self.modulus, self.wraps = int(count), int(modulus), int(modulus) == MODULUS_2_64
        # how many terms of at most q - 1 a uint64 holds (moduli here are below 2^63: at least 2)
        self.limit = 0 if self.wraps else ((1 << 64) - 1) // (self.modulus - 1)
        self.sums: dict[bool, np.ndarray | None] = {False: None, True: None}
        self.terms = {False: 0, True: 0}

    def add(self, values: np.ndarray, *, negative: bool = False) -> None:
        """Add (``negative``: subtract) ``values``, each below the modulus; the first array added is kept
        and summed into, not copied."""
        if self.wraps:  # one sum: uint64 arithmetic is arithmetic modulo 2^64
            negative, values = False, (np.negative(values) if negative else values)
        total = self.sums[negative]
        if total is None:
            self.sums[negative], self.terms[negative] = values, 1
            return
        if self.terms[negative] == self.limit:
            np.remainder(total, np.uint64(self.modulus), out=total)
            self.terms[negative] = 1
        total += values
        self.terms[negative] += 1

    def result(self) -> np.ndarray:
        """The sum modulo the modulus."""
        total, negative = self.sums[False], self.sums[True]
        if total is None:
            total = np.zeros(self.count, dtype=np.uint64)
        if self.wraps:
            return total
        q = np.uint64(self.modulus)
        if self.terms[False] > 1:
            np.remainder(total, q, out=total)
        if negative is not None:
            if self.terms[True] > 1:
                np.remainder(negative, q, out=negative)
            total += q - negative  # below 2q < 2^64
            np.remainder(total, q, out=total)
        return total
