"""Pairwise masks that cancel in the sum (secure aggregation after Bonawitz et al., CCS 2017, without Shamir shares).

Each member holds an X25519 key pair; every pair of members ``i, j`` derives one shared key ``k_ij``
(X25519, then HKDF-SHA256 bound to both names and both public keys). For a round, a member masks what it
sends with::

    mask_i = sum_{j > i} PRG(k_ij, binding) - sum_{j < i} PRG(k_ij, binding)   (mod q, for each modulus q)

over the round's sorted member list, so ``sum_i mask_i = 0`` exactly and the server's sum is unchanged,
while one member's masked values alone are uniform. The PRG is AES-256-CTR keyed by HKDF-Expand of
``k_ij`` over the binding (job, round, exchange, member list, section, chunk, modulus), and draws values below
each modulus without bias by rejection sampling its keystream (:mod:`jobs.he.mask_draws`). Nothing here is
a hand-written primitive: X25519, HKDF and AES come from ``cryptography``.

A member refuses a member list smaller than ``max(3, min_members)``: with two, the other member's update
*is* the sum minus one's own, and a server could otherwise isolate a victim with one colluder.
:func:`mask_ciphertexts` applies masks to CKKS ciphertext chunks (``c0``, modulo each prime, in their NTT
form, through :mod:`jobs.he.seal_bytes`); :mod:`jobs.he.fixed_point` applies them modulo 2^64 to
fixed-point integers (secure aggregation without HE). A dropout is met by a second exchange over the
shorter list, which is safe only with the self masks of :mod:`jobs.he.self_mask` (see there).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from jobs.he.mask_draws import MODULUS_2_64, ModularSum, draw_below
from jobs.he.seal_bytes import add_to_c0

MASK_VERSION = "consortium-mask/1"
CHUNKS_PER_STREAM = 64
"""Ciphertext chunks masked from one PRG stream per source and prime (64 x 8192 values: 4 MB at N = 8192)."""
FLOOR_MEMBERS = 3
"""No member masks for fewer: with two, each learns the other's update from the sum whatever is masked."""
_RAW = serialization.Encoding.Raw


class MaskRefused(ValueError):
    """A member will not mask for this member list (too short, without it, or with unknown members)."""


def new_private_key() -> X25519PrivateKey:
    """A member's fresh mask key (made in its kit by the key ceremony; it never leaves the member)."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key, for the member's kit."""
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's pair), for every member's kit."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(_RAW, serialization.PublicFormat.Raw)


def load_private_key(data: bytes, *, source: str = "mask key") -> X25519PrivateKey:
    if len(data) != 32:
        raise ValueError(f"{source}: {len(data)} bytes; an X25519 private key is 32 raw bytes (key ceremony)")
    return X25519PrivateKey.from_private_bytes(bytes(data))


def load_public_key(data: bytes, *, source: str = "mask public key") -> X25519PublicKey:
    if len(data) != 32:
        raise ValueError(f"{source}: {len(data)} bytes; an X25519 public key is 32 raw bytes (key ceremony)")
    return X25519PublicKey.from_public_bytes(bytes(data))


def key_fingerprint(public: bytes) -> str:
    """sha256 (hex) of a raw public key: what the audit log records for each member's mask key."""
    return hashlib.sha256(bytes(public)).hexdigest()


def required_members(min_members: int | None) -> int:
    """The shortest member list a member masks for: ``max(3, min_members)``."""
    return max(FLOOR_MEMBERS, int(min_members or 0))


@dataclass(frozen=True)
class RoundBinding:
    """What a round's masks are bound to: the job, the round, its member list (sorted, unique) and the exchange.

    ``exchange`` counts the round's exchanges (0 first; 1 when the server asks again after a dropout), so that
    no two messages of a member in one round share a mask, whatever the list.
    """

    job: str
    round: int
    members: tuple[str, ...]
    exchange: int = 0

    @classmethod
    def of(cls, job: str, round: int, members: Sequence[str], *, exchange: int = 0) -> RoundBinding:
        names = [str(m) for m in members]
        repeated = sorted({m for m in names if names.count(m) > 1})
        if repeated or any(not m for m in names):
            raise MaskRefused(
                f"member list {names} repeats {repeated} or holds an empty name; the server's list is bad"
            )
        if not str(job) or int(round) < 0 or int(exchange) < 0:
            raise MaskRefused(f"job '{job}', round {round}, exchange {exchange}: masks need a job id, round >= 0")
        return cls(job=str(job), round=int(round), members=tuple(sorted(names)), exchange=int(exchange))

    def info(self, *, section: str, chunk: int, modulus: int) -> bytes:
        """The HKDF info of one chunk's PRG streams, less the pair (:meth:`PairwiseMasker.mask` appends it).

        JSON, so unambiguous: no two bindings share a stream.
        """
        fields = [MASK_VERSION, "stream", self.job, self.round, self.exchange, list(self.members)]
        fields += [section, chunk, str(modulus)]
        return json.dumps(fields, separators=(",", ":")).encode()


class PairwiseMasker:
    """One member's masks: its name, its private mask key and every member's public mask key.

    Parameters
    ----------
    name
        This member's site name, as in the round's member list.
    private_key
        Its X25519 private key (:func:`new_private_key`).
    public_keys
        Every member's raw public key by name (its own included or not); a member outside it cannot be masked with.
    min_members
        ``training.min_members``; lists shorter than ``max(3, min_members)`` are refused.
    """

    def __init__(
        self, name: str, private_key: X25519PrivateKey, public_keys: Mapping[str, bytes], *, min_members: int | None
    ) -> None:
        self.name = str(name)
        self.min_members = required_members(min_members)
        own = public_bytes(private_key)
        if name in public_keys and bytes(public_keys[name]) != own:
            raise ValueError(f"the kit's public mask key for '{name}' is not this member's; reinstall the kit")
        self._pair_keys: dict[str, bytes] = {}
        for other, other_public in public_keys.items():
            if other == name:
                continue
            shared = private_key.exchange(load_public_key(other_public, source=f"public mask key of '{other}'"))
            (a, pa), (b, pb) = sorted([(self.name, own), (str(other), bytes(other_public))])
            info = json.dumps([MASK_VERSION, "pair", a, pa.hex(), b, pb.hex()], separators=(",", ":")).encode()
            self._pair_keys[str(other)] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
                shared
            )

    def check(self, binding: RoundBinding) -> None:
        """Raise :class:`MaskRefused` unless this member may mask for ``binding``'s member list."""
        members = binding.members
        if len(members) < self.min_members:
            raise MaskRefused(
                f"round {binding.round}: the server's member list {list(members)} has {len(members)} members, fewer "
                f"than {self.min_members} (max(3, training.min_members)); '{self.name}' will not mask for it, since "
                "so few would expose a member's update to the operator with a colluding member"
            )
        if self.name not in members:
            raise MaskRefused(
                f"round {binding.round}: '{self.name}' is not in the server's member list {list(members)}"
            )
        unknown = sorted(m for m in members if m != self.name and m not in self._pair_keys)
        if unknown:
            raise MaskRefused(f"round {binding.round}: no public mask key for {unknown}; reinstall the kits' mask keys")

    def mask(
        self,
        binding: RoundBinding,
        *,
        section: str,
        chunk: int,
        modulus: int,
        count: int,
        among: Sequence[str] | None = None,
    ) -> np.ndarray:
        """This member's mask for one chunk: ``count`` values below ``modulus`` (uint64).

        ``among``: the members that send this section (its holders in the round; default the round's list):
        pairs with the others are left out, so the section's masks cancel over its holders' sum.
        """
        self.check(binding)
        others = [m for m in (binding.members if among is None else among) if m != self.name]
        stray = sorted(set(others) - set(binding.members))
        if stray:
            raise MaskRefused(
                f"section '{section}': holders {stray} are not in the round's list {list(binding.members)}"
            )
        if modulus != MODULUS_2_64 and not 2 <= modulus < 1 << 63:
            raise ValueError(f"modulus {modulus}: masks are drawn modulo 2^64 or a prime below 2^63 (CKKS: 60 bits)")
        base = binding.info(section=section, chunk=chunk, modulus=modulus)
        total = ModularSum(count, modulus)
        for other in sorted(set(others)):
            info = base + json.dumps(sorted((self.name, other)), separators=(",", ":")).encode()
            key = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(self._pair_keys[other])
            total.add(draw_below(key, modulus, count), negative=other < self.name)
        return total.result()


class SectionPairs:
    """A :class:`PairwiseMasker` restricted to one section's holders (a :class:`MaskSource`)."""

    def __init__(self, masker: PairwiseMasker, among: Sequence[str]) -> None:
        self.masker, self.among = masker, tuple(among)

    def check(self, binding: RoundBinding) -> None:
        self.masker.check(binding)

    def mask(self, binding: RoundBinding, *, section: str, chunk: int, modulus: int, count: int) -> np.ndarray:
        return self.masker.mask(binding, section=section, chunk=chunk, modulus=modulus, count=count, among=self.among)


def data_moduli(context: ts.Context) -> np.ndarray:
    """The primes of a fresh ciphertext's level (the key-level prime excluded), as uint64."""
    parms = context.seal_context().data.first_context_data().parms()
    return np.array([m.value() for m in parms.coeff_modulus()], dtype=np.uint64)


class MaskSource(Protocol):
    """Anything that masks for a binding: :class:`PairwiseMasker`, :class:`jobs.he.self_mask.SelfMask`."""

    def check(self, binding: RoundBinding) -> None: ...

    def mask(self, binding: RoundBinding, *, section: str, chunk: int, modulus: int, count: int) -> np.ndarray: ...


def combined_mask(
    sources: Sequence[MaskSource], binding: RoundBinding, *, section: str, chunk: int, modulus: int, count: int
) -> np.ndarray:
    """The sum of the sources' masks for one chunk, modulo ``modulus`` (each source returns a new array)."""
    total = ModularSum(count, modulus)
    for source in sources:
        total.add(source.mask(binding, section=section, chunk=chunk, modulus=modulus, count=count))
    return total.result()


def ciphertext_masks(
    context: ts.Context,
    sources: Sequence[MaskSource],
    binding: RoundBinding,
    *,
    section: str,
    n_chunks: int,
    subtract: bool = False,
) -> list[list[np.ndarray]]:
    """The sources' masks for ``n_chunks`` chunks of a section: per block of :data:`CHUNKS_PER_STREAM` chunks,
    one array per prime of the level (negated modulo the prime with ``subtract``).

    They depend on the binding and the section's size, not on the values: a member can draw them while it
    trains (:class:`jobs.member_masks.MemberMasks`). Refuses (:class:`MaskRefused`) if a source refuses.
    """
    if not sources:
        raise ValueError("no mask source given; pass the member's PairwiseMasker (and SelfMask)")
    for source in sources:
        source.check(binding)
    moduli = data_moduli(context).tolist()
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    blocks = []
    # one stream per source and prime over a block of chunks, one after the other: few calls, bounded memory
    for block, first_chunk in enumerate(range(0, n_chunks, CHUNKS_PER_STREAM)):
        count = min(CHUNKS_PER_STREAM, n_chunks - first_chunk) * degree
        masks = []
        for q in moduli:
            mask = combined_mask(sources, binding, section=section, chunk=block, modulus=int(q), count=count)
            masks.append(np.subtract(np.uint64(q), mask) % np.uint64(q) if subtract else mask)
        blocks.append(masks)
    return blocks


def apply_masks(
    context: ts.Context, chunks: Sequence[bytes], masks: list[list[np.ndarray]], *, section: str
) -> list[bytes]:
    """Serialized CKKS chunks with ``masks`` (:func:`ciphertext_masks`) added to ``c0``; seeded chunks stay
    seeded and keep their size."""
    moduli = data_moduli(context)
    first = list(context.seal_context().data.first_parms_id())
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    if len(masks) != -(-len(chunks) // CHUNKS_PER_STREAM):
        raise ValueError(f"section '{section}': masks for {len(masks)} blocks, {len(chunks)} chunks")
    out = []
    for index, chunk in enumerate(chunks):
        block, offset = divmod(index, CHUNKS_PER_STREAM)
        rows = np.stack([mask[offset * degree : (offset + 1) * degree] for mask in masks[block]])
        out.append(add_to_c0(bytes(chunk), rows, moduli, where=f"section '{section}' chunk {index}", parms_id=first))
    return out


def mask_ciphertexts(
    context: ts.Context,
    sources: Sequence[MaskSource],
    binding: RoundBinding,
    *,
    section: str,
    chunks: Sequence[bytes],
    subtract: bool = False,
) -> list[bytes]:
    """Serialized CKKS chunks with the sources' masks added to (``subtract``: taken from) ``c0``.

    A member adds its pairwise (and self) masks to the chunks of :func:`jobs.he.packing.encrypt_flat`; the
    server takes the revealed self masks (:class:`jobs.he.self_mask.RevealedSelfMask`) from its sum. Every
    residue of ``c0`` is masked, modulo each prime of the ciphertext's level; seeded chunks stay seeded and
    keep their size. Refuses (:class:`MaskRefused`) before touching anything if a source refuses the binding.
    """
    masks = ciphertext_masks(context, sources, binding, section=section, n_chunks=len(chunks), subtract=subtract)
    return apply_masks(context, chunks, masks, section=section)
