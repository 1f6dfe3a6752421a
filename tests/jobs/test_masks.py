"""Pairwise masks: key agreement, unbiased PRG draws, refusals, and secure aggregation over fixed point mod 2^64."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from scipy import stats

from jobs.he import fixed_point as fp
from jobs.he.mask_draws import MODULUS_2_64, ModularSum, draw_below
from jobs.he.masks import (
    MaskRefused,
    PairwiseMasker,
    RoundBinding,
    key_fingerprint,
    load_private_key,
    new_private_key,
    private_bytes,
    public_bytes,
    required_members,
)
from jobs.he.self_mask import RevealedSelfMask, SelfMask

SITES = ("site-1", "site-2", "site-3")
PRIME_60 = 1152921504606830593  # the 60-bit prime of the consortium's default CKKS chain


def fixed_key(name: str):
    """A member's key from its name: the tests' chi-square checks then see the same draws every run (a test on
    fresh random keys would fail 1% of runs by chance at p < 0.01)."""
    return load_private_key(hashlib.sha256(f"test mask key of {name}".encode()).digest())


def fixed_seeds(monkeypatch) -> None:
    """Self-mask seeds from a counter instead of os.urandom, for the same reason."""
    counter = itertools.count()
    monkeypatch.setattr(
        "jobs.he.self_mask.os.urandom", lambda n: hashlib.sha256(f"seed {next(counter)}".encode()).digest()[:n]
    )


def maskers(names=SITES, *, min_members=None) -> dict[str, PairwiseMasker]:
    keys = {name: fixed_key(name) for name in names}
    public = {name: public_bytes(key) for name, key in keys.items()}
    return {name: PairwiseMasker(name, keys[name], public, min_members=min_members) for name in names}


def uniformity_p(values: np.ndarray, modulus: int, *, bins: int = 100) -> float:
    """Chi-square p-value of ``values`` (uint64 below ``modulus``) in equal bins of [0, modulus)."""
    cells = np.minimum((values.astype(np.float64) / float(modulus) * bins).astype(np.int64), bins - 1)
    return float(stats.chisquare(np.bincount(cells, minlength=bins)).pvalue)


@pytest.mark.parametrize("modulus", [97, PRIME_60, (MODULUS_2_64 // 3) * 2 + 1, MODULUS_2_64])
def test_draws_are_uniform_below_the_modulus(modulus):
    draws = draw_below(bytes(range(32)), modulus, 200_000)
    assert draws.dtype == np.uint64 and draws.size == 200_000
    assert int(draws.max()) < modulus
    if modulus == 97:  # every residue its own cell
        assert stats.chisquare(np.bincount(draws.astype(np.int64), minlength=97)).pvalue > 0.01
    else:
        # at 2^64 * 2/3 a plain "word mod q" would put twice the mass below 2^64 / 3: p ~ 0 with these counts
        assert uniformity_p(draws, modulus) > 0.01


def test_draws_are_deterministic_per_key_and_differ_between_keys():
    first = draw_below(b"k" * 32, PRIME_60, 5_000)
    np.testing.assert_array_equal(first, draw_below(b"k" * 32, PRIME_60, 5_000))
    np.testing.assert_array_equal(first[:1_000], draw_below(b"k" * 32, PRIME_60, 1_000))  # a prefix of one stream
    assert np.mean(first == draw_below(b"j" * 32, PRIME_60, 5_000)) == 0.0


def test_draws_are_the_aes_ctr_keystream_words():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 3_000))
    words = np.frombuffer(stream, dtype="<u8")
    np.testing.assert_array_equal(draw_below(key, MODULUS_2_64, 3_000), words)
    cut = words & np.uint64((1 << 60) - 1)
    np.testing.assert_array_equal(draw_below(key, PRIME_60, 2_000), cut[cut < PRIME_60][:2_000])


@pytest.mark.parametrize("modulus", [PRIME_60, 2**40 - 87, 97, MODULUS_2_64])
def test_a_lazily_reduced_sum_is_the_sum_reduced_term_by_term(modulus):
    rng = np.random.default_rng(5)
    terms = [rng.integers(0, modulus - 1, 300, dtype=np.uint64, endpoint=True) for _ in range(40)]  # > 16 a side
    negative = rng.random(40) < 0.3
    expected = [0] * 300
    total = ModularSum(300, modulus)
    for values, minus in zip(terms, negative, strict=True):
        expected = [
            (e - int(v) if minus else e + int(v)) % modulus for e, v in zip(expected, values.tolist(), strict=True)
        ]
        total.add(values.copy(), negative=bool(minus))
    assert total.result().tolist() == expected
    assert ModularSum(4, modulus).result().tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("modulus", [PRIME_60, MODULUS_2_64])
def test_masks_cancel_exactly_in_the_sum_of_20_members(modulus):
    names = [f"m{i:02d}" for i in range(20)]  # the first member adds 19 pairwise draws: reduced lazily
    group = maskers(names)
    binding = RoundBinding.of("job-1", 0, names)
    total = [0] * 512
    for m in group.values():
        mask = m.mask(binding, section="trunk", chunk=1, modulus=modulus, count=512).tolist()
        total = [(t + v) % modulus for t, v in zip(total, mask, strict=True)]
    assert total == [0] * 512


@pytest.mark.parametrize("modulus", [PRIME_60, MODULUS_2_64])
def test_masks_cancel_exactly_in_the_sum(modulus):
    group = maskers(("d", "b", "a", "c"))
    binding = RoundBinding.of("job-1", 3, ["c", "a", "d", "b"])
    masks = [m.mask(binding, section="trunk", chunk=0, modulus=modulus, count=4_096) for m in group.values()]
    total = [0] * 4_096
    for mask in masks:
        total = [(t + int(v)) % modulus for t, v in zip(total, mask.tolist(), strict=True)]
    assert total == [0] * 4_096
    assert all(int(mask.max()) > 0 for mask in masks)
    assert uniformity_p(masks[0], modulus) > 0.01


def test_masks_are_bound_to_job_round_exchange_section_chunk_and_member_list():
    group = maskers(("a", "b", "c", "d"))
    base = RoundBinding.of("job-1", 1, ["a", "b", "c", "d"])
    masker = group["a"]
    reference = masker.mask(base, section="trunk", chunk=0, modulus=PRIME_60, count=256)
    variants = [
        masker.mask(RoundBinding.of("job-2", 1, base.members), section="trunk", chunk=0, modulus=PRIME_60, count=256),
        masker.mask(RoundBinding.of("job-1", 2, base.members), section="trunk", chunk=0, modulus=PRIME_60, count=256),
        masker.mask(
            RoundBinding.of("job-1", 1, base.members, exchange=1), section="trunk", chunk=0, modulus=PRIME_60, count=256
        ),
        masker.mask(base, section="statistics", chunk=0, modulus=PRIME_60, count=256),
        masker.mask(base, section="trunk", chunk=1, modulus=PRIME_60, count=256),
        masker.mask(
            RoundBinding.of("job-1", 1, ["a", "b", "c"]), section="trunk", chunk=0, modulus=PRIME_60, count=256
        ),
    ]
    for variant in variants:
        assert not np.any(variant == reference)


def test_pair_keys_agree_from_both_sides_and_survive_serialization():
    keys = {name: new_private_key() for name in SITES}
    public = {name: public_bytes(key) for name, key in keys.items()}
    reloaded = load_private_key(private_bytes(keys["site-2"]))
    again = PairwiseMasker("site-2", reloaded, public, min_members=3)
    first = PairwiseMasker("site-2", keys["site-2"], public, min_members=3)
    binding = RoundBinding.of("job", 0, SITES)
    np.testing.assert_array_equal(
        first.mask(binding, section="s", chunk=0, modulus=PRIME_60, count=64),
        again.mask(binding, section="s", chunk=0, modulus=PRIME_60, count=64),
    )
    assert len(key_fingerprint(public["site-1"])) == 64
    with pytest.raises(ValueError, match="not this member's"):
        PairwiseMasker("site-1", keys["site-2"], public, min_members=3)
    with pytest.raises(ValueError, match="32 raw bytes"):
        load_private_key(b"short")


def test_a_list_below_min_members_is_refused():
    assert required_members(None) == 3 and required_members(2) == 3 and required_members(5) == 5
    group = maskers(("a", "b", "c", "d", "e"), min_members=4)
    with pytest.raises(MaskRefused, match=r"has 3 members, fewer than 4"):
        group["a"].mask(RoundBinding.of("job", 1, ["a", "b", "c"]), section="s", chunk=0, modulus=97, count=4)
    two = maskers(("a", "b"))
    with pytest.raises(MaskRefused, match="fewer than 3"):
        two["a"].check(RoundBinding.of("job", 1, ["a", "b"]))
    with pytest.raises(MaskRefused, match="is not in the server's member list"):
        group["e"].check(RoundBinding.of("job", 1, ["a", "b", "c", "d"]))
    with pytest.raises(MaskRefused, match=r"no public mask key for \['x'\]"):
        group["a"].check(RoundBinding.of("job", 1, ["a", "b", "c", "x"]))
    with pytest.raises(MaskRefused, match="repeats"):
        RoundBinding.of("job", 1, ["a", "b", "b"])


def test_fixed_point_secure_sum_matches_the_plain_sum_within_the_quantization_bound(monkeypatch):
    fixed_seeds(monkeypatch)
    rng = np.random.default_rng(7)
    group = maskers(SITES)
    own = {name: SelfMask(name) for name in SITES}
    binding = RoundBinding.of("job", 4, SITES)
    updates = {name: rng.normal(scale=3.0, size=150_000) for name in SITES}
    sent = {
        name: fp.mask_words([group[name], own[name]], binding, section="trunk", words=fp.quantize(values))
        for name, values in updates.items()
    }
    revealed = [RevealedSelfMask(own[name].reveal(binding)) for name in SITES]
    summed = fp.mask_words(revealed, binding, section="trunk", words=fp.sum_words(list(sent.values())), subtract=True)
    total = fp.dequantize(summed)
    exact = sum(updates.values())
    bound = fp.error_bound(len(SITES))
    assert bound == pytest.approx(3 * 2.0**-33)
    assert np.max(np.abs(total - exact)) <= bound
    # the operator's view of one member: words uncorrelated with its update and uniform over 2^64
    seen = sent["site-1"]
    assert abs(np.corrcoef(fp.dequantize(seen), updates["site-1"])[0, 1]) < 0.02
    assert uniformity_p(seen, MODULUS_2_64) > 0.01


def test_a_second_exchange_never_opens_two_sums_of_one_round():
    """The server claims site-4 dropped and asks again: it can open the first sum or the second, not both."""
    names = ("site-1", "site-2", "site-3", "site-4")
    group, own = maskers(names), {name: SelfMask(name) for name in names}
    rng = np.random.default_rng(3)
    words = {name: fp.quantize(rng.normal(size=1_000)) for name in names}
    first = RoundBinding.of("job", 5, names)
    second = RoundBinding.of("job", 5, names[:3], exchange=1)
    sums = {
        binding.exchange: fp.sum_words(
            [fp.mask_words([group[n], own[n]], binding, section="trunk", words=words[n]) for n in binding.members]
        )
        for binding in (first, second)
    }
    # the second exchange's members reveal its seeds: its sum opens to the sum over site-1..3
    seeds = [RevealedSelfMask(own[name].reveal(second)) for name in second.members]
    opened = fp.mask_words(seeds, second, section="trunk", words=sums[1], subtract=True)
    exact = sum(fp.dequantize(words[name]) for name in second.members)
    assert np.max(np.abs(fp.dequantize(opened) - exact)) <= fp.error_bound(3)
    # the first exchange's sum then stays masked: site-1..3 refuse its seeds, only site-4's is to be had
    first_seeds = [RevealedSelfMask(own["site-4"].reveal(first))]
    for name in second.members:
        with pytest.raises(MaskRefused, match="revealed exchange 1 already"):
            own[name].reveal(first)
    still = fp.dequantize(fp.mask_words(first_seeds, first, section="trunk", words=sums[0], subtract=True))
    assert np.median(np.abs(still - exact)) > 1e6
    with pytest.raises(MaskRefused, match="revealed exchange 1 already"):
        own["site-1"].reveal(first)
    with pytest.raises(MaskRefused, match="masks no further exchange"):
        fp.mask_words(
            [group["site-1"], own["site-1"]],
            RoundBinding.of("job", 5, names[:3], exchange=2),
            section="t",
            words=words["site-1"],
        )
    assert own["site-1"].reveal(second) == own["site-1"].reveal(second)  # the same exchange may be asked again
    with pytest.raises(MaskRefused, match="revealed exchange 0 already"):
        own["site-4"].reveal(second)
    with pytest.raises(MaskRefused, match="is not in the list"):
        SelfMask("site-9").reveal(second)
    with pytest.raises(MaskRefused, match="sent nothing in exchange 1"):
        SelfMask("site-2").reveal(second)
    # another round is unaffected
    fp.mask_words(
        [group["site-1"], own["site-1"]], RoundBinding.of("job", 6, names), section="trunk", words=words["site-1"]
    )


def test_fixed_point_refuses_values_that_could_wrap_the_sum():
    limit = fp.value_limit()
    assert limit == 2.0**31 / 64
    fp.quantize(np.array([limit * 0.99]))
    with pytest.raises(ValueError, match="fewer fractional bits"):
        fp.quantize(np.array([0.0, -limit]), name="statistics")
    with pytest.raises(ValueError, match="NaN or inf"):
        fp.quantize(np.array([np.nan]))
    words = fp.quantize(np.array([-1.5, 2.25, 0.0]))
    np.testing.assert_array_equal(fp.dequantize(words), [-1.5, 2.25, 0.0])
