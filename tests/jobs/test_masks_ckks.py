"""Pairwise masks inside CKKS ciphertexts: one member's ciphertext decrypts to noise, the sum to the true sum."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tenseal as ts
from scipy import stats
from tenseal import sealapi

from jobs.he.context import make_contexts
from jobs.he.masks import (
    MaskRefused,
    PairwiseMasker,
    RoundBinding,
    data_moduli,
    mask_ciphertexts,
    public_bytes,
)
from jobs.he.packing import add_into, decrypt_flat, encrypt_flat, load_chunks, serialize_chunks
from jobs.he.seal_bytes import COMPR_NONE, CiphertextBytes, SealFormatError
from jobs.he.self_mask import RevealedSelfMask, SelfMask
from schema.config import HomomorphicEncryption
from tests.jobs.test_masks import fixed_key, fixed_seeds

SITES = ("site-1", "site-2", "site-3")
N_VALUES = 13 * 8192  # 106,496 values: 13 full chunks at N = 8192


@pytest.fixture(scope="module")
def group() -> dict[str, PairwiseMasker]:
    keys = {name: fixed_key(name) for name in SITES}  # fixed: the chi-square checks see the same draws every run
    public = {name: public_bytes(key) for name, key in keys.items()}
    return {name: PairwiseMasker(name, keys[name], public, min_members=3) for name in SITES}


@pytest.fixture(scope="module")
def updates() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {name: rng.normal(loc=0.1 * i, scale=0.05, size=N_VALUES) for i, name in enumerate(SITES)}


BINDING = RoundBinding.of("job-masks", 2, SITES)


@pytest.fixture(scope="module")
def self_masks() -> Iterator[dict[str, SelfMask]]:
    with pytest.MonkeyPatch.context() as patch:  # seeds drawn while the module's fixtures mask: fixed too
        fixed_seeds(patch)
        yield {name: SelfMask(name) for name in SITES}


@pytest.fixture(scope="module")
def sent(member_context, group, self_masks, updates) -> dict[str, list[bytes]]:
    """Each member's trunk, encrypted, with its pairwise and self masks."""
    return {
        name: mask_ciphertexts(
            member_context,
            [group[name], self_masks[name]],
            BINDING,
            section="trunk",
            chunks=encrypt_flat(member_context, values),
        )
        for name, values in updates.items()
    }


def decrypted_coefficients(context, chunks: list[bytes]) -> np.ndarray:
    """What a member holding the secret key reads from ciphertexts: the plaintext polynomials' coefficients.

    SEAL decodes slot ``j`` as the polynomial (centered, over the scale) at the root ``zeta^(3^j mod 2N)``, its
    conjugate at ``zeta^-(3^j)``; all ``N`` odd powers of ``zeta = exp(i pi / N)`` together give the coefficients
    back by one FFT. Returns them times the scale (integers, up to CKKS rounding), chunk after chunk.
    """
    seal_context = context.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    degree = 2 * encoder.slot_count()
    roots = np.array([pow(3, j, 2 * degree) for j in range(degree // 2)])
    twist = np.exp(1j * np.pi * np.arange(degree) / degree)
    out = []
    for vector in load_chunks(context, chunks):
        plain = sealapi.Plaintext()
        decryptor.decrypt(vector, plain)
        slots = np.asarray(encoder.decode_complex(plain), dtype=np.complex128)
        at_odd_powers = np.zeros(degree, dtype=np.complex128)
        at_odd_powers[(roots - 1) // 2] = slots
        at_odd_powers[(2 * degree - roots - 1) // 2] = np.conj(slots)
        out.append((np.fft.fft(at_odd_powers) / degree / twist).real * context.global_scale)
    return np.concatenate(out)


def residue_uniformity_p(coefficients: np.ndarray, prime: int, *, bins: int = 100) -> float:
    """Chi-square p-value of the coefficients' residues modulo ``prime`` in ``bins`` equal cells."""
    cells = np.minimum((np.mod(coefficients / prime, 1.0) * bins).astype(np.int64), bins - 1)
    return float(stats.chisquare(np.bincount(cells, minlength=bins)).pvalue)


def test_masking_keeps_the_chunks_seeded_and_their_size(member_context, updates, sent):
    plain = encrypt_flat(member_context, updates["site-1"])
    # no larger: 60-bit residues are written uncompressed (zstd only adds its frame to random words)
    assert all(len(m) <= len(c) <= len(m) + 64 for m, c in zip(sent["site-1"], plain, strict=True))
    opened = CiphertextBytes.parse(sent["site-1"][0])
    assert opened.compression == COMPR_NONE
    assert opened.seeded and opened.is_ntt_form and opened.size == 2
    assert opened.c0.shape == (1, 8192)  # [60, 40]: one data prime, the 40-bit one is the key level's
    assert opened.parms_id == tuple(member_context.seal_context().data.first_parms_id())


def test_one_members_ciphertext_decrypts_to_uniform_noise(member_context, updates, sent):
    """The operator with one member's secret key reads another member's masked ciphertext."""
    read = decrypt_flat(member_context, sent["site-2"], n_values=N_VALUES)
    assert read.size >= 100_000
    assert abs(np.corrcoef(read, updates["site-2"])[0, 1]) < 0.02
    assert np.median(np.abs(read - updates["site-2"])) > 1e3  # nowhere near the values (|value| < 1)
    (prime,) = data_moduli(member_context).tolist()
    # unmasked, the coefficients are integers near 0 (values times the scale): not uniform at all
    bare = decrypted_coefficients(member_context, encrypt_flat(member_context, updates["site-2"]))
    assert np.max(np.abs(bare - np.rint(bare))) < 0.01  # the FFT above inverts SEAL's decoding exactly
    assert residue_uniformity_p(bare, prime) < 1e-6
    masked = decrypted_coefficients(member_context, sent["site-2"])
    assert masked.size >= 100_000
    assert residue_uniformity_p(masked, prime) > 0.01


def test_the_sum_of_masked_ciphertexts_decrypts_to_the_true_sum(
    member_context, server_context, self_masks, updates, sent
):
    total = None
    for chunks in sent.values():
        total = add_into(server_context, total, load_chunks(server_context, chunks))
    summed = serialize_chunks(total)
    exact = sum(updates.values())
    # before the reveal the self masks still hide the sum
    assert np.median(np.abs(decrypt_flat(member_context, summed, n_values=N_VALUES) - exact)) > 1e3
    revealed = [RevealedSelfMask(self_masks[name].reveal(BINDING)) for name in SITES]
    opened = mask_ciphertexts(server_context, revealed, BINDING, section="trunk", chunks=summed, subtract=True)
    # a sum is a full ciphertext, and stays one (no larger: written uncompressed)
    assert all(len(o) <= len(c) <= len(o) + 64 for o, c in zip(opened, summed, strict=True))
    assert all(CiphertextBytes.parse(o).size == 2 and not CiphertextBytes.parse(o).seeded for o in opened)
    result = decrypt_flat(member_context, opened, n_values=N_VALUES)
    assert np.max(np.abs(result - exact) / np.maximum(np.abs(exact), 1e-3)) < 1e-6


def test_a_short_list_is_refused_before_any_chunk_is_touched(member_context, group, updates):
    chunks = encrypt_flat(member_context, updates["site-1"][:100])
    with pytest.raises(MaskRefused, match="fewer than 3"):
        mask_ciphertexts(
            member_context, [group["site-1"]], RoundBinding.of("job", 1, SITES[:2]), section="trunk", chunks=chunks
        )


def test_opened_bytes_round_trip_and_reject_garbage(member_context, updates):
    chunk = encrypt_flat(member_context, updates["site-3"][:8192])[0]
    opened = CiphertextBytes.parse(chunk)
    assert opened.to_bytes() == CiphertextBytes.parse(opened.to_bytes()).to_bytes()
    uncompressed = opened.to_bytes(compression=COMPR_NONE)
    back = decrypt_flat(member_context, [uncompressed], n_values=8192)
    assert np.max(np.abs(back - updates["site-3"][:8192])) < 1e-6
    with pytest.raises(SealFormatError, match="no SEAL header"):
        CiphertextBytes.parse(b"x" * 64)
    with pytest.raises(SealFormatError, match="truncated"):
        CiphertextBytes.parse(chunk[:-10])


def test_masks_cover_every_prime_of_a_longer_chain(group):
    """[60, 40, 40]: a fresh ciphertext holds two data primes; each is masked, and the masks cancel in each."""
    client, public = make_contexts(HomomorphicEncryption(coeff_mod_bit_sizes=[60, 40, 40]))
    member, server = ts.context_from(client), ts.context_from(public)
    assert len(data_moduli(member)) == 2
    binding = RoundBinding.of("job-chain", 0, SITES)
    rng = np.random.default_rng(5)
    values = {name: rng.normal(size=9_000) for name in SITES}
    total = None
    for name in SITES:
        chunks = mask_ciphertexts(
            member, [group[name]], binding, section="s", chunks=encrypt_flat(member, values[name])
        )
        assert CiphertextBytes.parse(chunks[0]).c0.shape == (2, 8192)
        assert CiphertextBytes.parse(chunks[0]).compression != COMPR_NONE  # 40-bit residues: zstd pays
        alone = decrypt_flat(member, chunks, n_values=9_000)
        assert abs(np.corrcoef(alone, values[name])[0, 1]) < 0.1
        total = add_into(server, total, load_chunks(server, chunks))
    summed = decrypt_flat(member, serialize_chunks(total), n_values=9_000)
    assert np.max(np.abs(summed - sum(values.values()))) < 1e-5
