"""Self masks (the double masking of Bonawitz et al.): what keeps a second exchange from exposing a member.

Pairwise masks alone leave one hole in a round with a second exchange. The server asks the members of
``L1`` and then, claiming that member ``j`` dropped, asks ``L2 = L1 - {j}`` again. If ``j``'s first message
did arrive, the server holds two complete sums, over ``L1`` and over ``L2``, and a colluding member
decrypts both: their difference is ``j``'s update.

So each member also adds a self mask, drawn from a secret seed of its own that is fresh for each
(job, round, exchange): no sum opens until the server has the self-mask seeds of every contributor of
that exchange, which each member reveals in a last, small message (32 bytes) of the round. A member
reveals **at most one exchange per round**, and masks no exchange of a round once it has revealed one:
the server can open the sum over ``L1`` or the one over ``L2``, never both. The server takes the revealed
self masks from its sum (:class:`RevealedSelfMask` with ``subtract=True`` in
:func:`jobs.he.masks.mask_ciphertexts` or :func:`jobs.he.fixed_point.mask_words`). A member that restarts
mid-round forgets what it revealed: its ledger must be kept in its workspace (not done here).
"""

from __future__ import annotations

import json
import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from jobs.he.mask_draws import draw_below
from jobs.he.masks import MaskRefused, RoundBinding

_SELF = json.dumps(["self"]).encode()  # appended to the stream info; pair streams append two names


class RevealedSelfMask:
    """A self mask from its revealed seed: what the server takes from the sum (and what the member adds)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"a self-mask seed is 32 bytes, got {len(seed)}; the member's reveal is damaged")
        self.seed = bytes(seed)

    def check(self, binding: RoundBinding) -> None:
        """A revealed seed masks any binding it is asked for (the member checked when it masked)."""

    def mask(self, binding: RoundBinding, *, section: str, chunk: int, modulus: int, count: int) -> np.ndarray:
        info = binding.info(section=section, chunk=chunk, modulus=modulus) + _SELF
        key = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(self.seed)
        return draw_below(key, modulus, count)


class SelfMask:
    """One member's self masks in one job: a fresh seed per (round, exchange), revealed at most once per round."""

    def __init__(self, name: str) -> None:
        self.name = str(name)
        self._seeds: dict[tuple[str, int, int], bytes] = {}
        self._revealed: dict[tuple[str, int], int] = {}

    def check(self, binding: RoundBinding) -> None:
        """Raise :class:`MaskRefused` once this member revealed a self mask of ``binding``'s round."""
        revealed = self._revealed.get((binding.job, binding.round))
        if revealed is not None:
            raise MaskRefused(
                f"round {binding.round}: '{self.name}' already revealed its self mask of exchange {revealed}; it masks "
                f"no further exchange of this round (the server could otherwise open two sums and subtract them)"
            )

    def mask(self, binding: RoundBinding, *, section: str, chunk: int, modulus: int, count: int) -> np.ndarray:
        self.check(binding)
        seed = self._seeds.setdefault((binding.job, binding.round, binding.exchange), os.urandom(32))
        return RevealedSelfMask(seed).mask(binding, section=section, chunk=chunk, modulus=modulus, count=count)

    def reveal(self, binding: RoundBinding) -> bytes:
        """The seed of ``binding``'s exchange, for the server to unmask the sum; once per round."""
        key = (binding.job, binding.round)
        if self._revealed.get(key, binding.exchange) != binding.exchange:
            raise MaskRefused(
                f"round {binding.round}: '{self.name}' revealed exchange {self._revealed[key]} already; "
                f"it will not reveal exchange {binding.exchange} as well"
            )
        if self.name not in binding.members:
            raise MaskRefused(f"round {binding.round}: '{self.name}' is not in the list {list(binding.members)}")
        seed = self._seeds.get((binding.job, binding.round, binding.exchange))
        if seed is None:
            raise MaskRefused(f"round {binding.round}: '{self.name}' sent nothing in exchange {binding.exchange}")
        self._revealed[key] = binding.exchange
        return seed
