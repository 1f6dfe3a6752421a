"""Encrypt sections at three members, add them under the public context, decrypt at a member (real TenSEAL)."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind

from jobs.he.context import check_key_pair, context_from_bytes, headroom, make_contexts, slot_count
from jobs.he.packing import (
    Layout,
    add_into,
    chunk_capacity,
    decrypt_flat,
    encrypt_flat,
    flatten,
    load_chunks,
    pack_slots,
    serialize_chunks,
    slot_peak,
    unflatten,
    unpack_slots,
)
from jobs.he.payload import (
    MAX_CONTRIBUTORS,
    CiphertextSum,
    EncryptedUpdate,
    decrypt_update,
    encrypt_update,
    is_encrypted_dxo,
)
from jobs.sections import SECTIONS_META, finalize, weighted_update
from schema.config import HomomorphicEncryption

# Measured with N=8192, [60, 40], scale 2^40: max abs error ~1e-9 on weighted means of values of
# order 1; the bound leaves three orders of magnitude of margin.
TOLERANCE = 1e-6
STEPS = (30.0, 50.0, 20.0)


def _params(seed: int, *, head: bool) -> dict[str, np.ndarray]:
    """A stand-in update: a trunk of 9.6k values (two 8192-value chunks), a shared head, statistics, attributions."""
    rng = np.random.default_rng(seed)
    params = {
        "trunk.0.weight": rng.normal(scale=0.5, size=(64, 130)),
        "trunk.0.bias": rng.normal(scale=0.1, size=64),
        "trunk.1.weight": np.ones(64),
        "trunk.4.weight": rng.normal(scale=0.5, size=(16, 64)),
        "trunk.4.bias": rng.normal(scale=0.1, size=16),
        "stats.os.n": np.full(100, 150.0 + seed),
        "stats.os.sum_sq": rng.uniform(1e4, 5e6, size=100),  # sums of squares over hundreds of samples
        "consensus.os.score": rng.dirichlet(np.ones(100)),
    }
    if head:
        params["heads.os.0.weight"] = rng.normal(scale=0.3, size=(8, 16))
        params["heads.os.0.bias"] = rng.normal(scale=0.1, size=8)
    return params


def _weighted(params: dict[str, np.ndarray], steps: float) -> tuple[dict, dict]:
    weights = {"trunk": steps, **({"head:os": steps} if "heads.os.0.bias" in params else {})}
    return weighted_update(params, weights=weights)


@pytest.fixture(scope="module")
def members() -> list[dict[str, np.ndarray]]:
    """Three members; the third does not hold the shared endpoint 'os' head."""
    return [_params(1, head=True), _params(2, head=True), _params(3, head=False)]


@pytest.fixture(scope="module")
def decrypted(members, member_context, server_context) -> tuple[dict[str, np.ndarray], EncryptedUpdate]:
    """The finalized decrypted sum of the three members' encrypted updates, and that encrypted sum."""
    summed = CiphertextSum(server_context)  # the operator: public context, additions only
    for params, steps in zip(members, STEPS, strict=True):
        weighted, meta = _weighted(params, steps)
        summed.add(encrypt_update(member_context, weighted, meta=meta))
    aggregate = summed.result()
    return finalize(decrypt_update(member_context, aggregate), aggregate.meta), aggregate


def test_decrypted_sum_equals_the_plaintext_sum(members, decrypted):
    plain, aggregate = decrypted
    assert set(plain) == set(members[0])
    trunk_keys = [k for k in members[0] if k.startswith("trunk.")]
    for key in trunk_keys:
        expected = sum(n * m[key] for m, n in zip(members, STEPS, strict=True)) / sum(STEPS)
        assert plain[key].shape == expected.shape and plain[key].dtype == np.float64
        assert np.max(np.abs(plain[key] - expected)) < TOLERANCE, key
    for key in ("stats.os.n", "stats.os.sum_sq", "consensus.os.score"):
        expected = sum(m[key] for m in members)
        np.testing.assert_allclose(plain[key], expected, rtol=TOLERANCE, err_msg=key)
    sections = aggregate.described
    assert (sections["trunk"].weight, sections["trunk"].contributors) == (100.0, 3)
    assert (sections["stats:os"].weight, sections["stats:os"].contributors) == (3.0, 3)


def test_a_shared_head_is_averaged_over_its_holders_only(members, decrypted):
    plain, aggregate = decrypted
    assert aggregate.described["head:os"].weight == STEPS[0] + STEPS[1]
    assert aggregate.described["head:os"].contributors == 2
    for key in ("heads.os.0.weight", "heads.os.0.bias"):
        expected = (STEPS[0] * members[0][key] + STEPS[1] * members[1][key]) / (STEPS[0] + STEPS[1])
        assert np.max(np.abs(plain[key] - expected)) < TOLERANCE, key


def test_the_aggregate_is_ciphertext_the_server_cannot_read(members, decrypted, server_context):
    _, aggregate = decrypted
    trunk = aggregate.sections["trunk"]
    assert len(trunk.chunks) == -(-trunk.layout.total // (2 * slot_count(server_context))) == 2
    blob = b"".join(c for s in aggregate.sections.values() for c in s.chunks)
    for name, array in members[0].items():
        head = array.ravel()[:4]
        assert head.astype(np.float32).tobytes() not in blob, name
        assert head.astype(np.float64).tobytes() not in blob, name
    with pytest.raises(ValueError, match="holds no secret key; only a member can decrypt the aggregate"):
        decrypt_update(server_context, aggregate)
    with pytest.raises(ValueError, match="no secret key"):  # nor can it encrypt: members encrypt symmetrically
        encrypt_update(server_context, {"trunk.0.bias": np.ones(2)}, meta=_weighted({"trunk.0.bias": np.ones(2)}, 1)[1])
    assert is_encrypted_dxo(aggregate.to_dxo())


def test_the_server_context_holds_no_secret_key(he_contexts, member_context, server_context):
    client, server = he_contexts
    assert member_context.is_private() and not server_context.is_private()
    with pytest.raises(ValueError, match="holds a SECRET key, but the operator's server must only hold the public"):
        context_from_bytes(client, source="server_context.tenseal", private=False)
    with pytest.raises(ValueError, match="client_context.tenseal: holds no secret key"):
        context_from_bytes(server, source="client_context.tenseal", private=True)
    with pytest.raises(ValueError, match="garbage: not a TenSEAL context"):
        context_from_bytes(b"\x00" * 32, source="garbage", private=False)
    check_key_pair(member_context, server_context)


def test_contexts_of_two_key_ceremonies_do_not_fit(he_settings, member_context):
    _, other_server = make_contexts(he_settings)
    with pytest.raises(ValueError, match="not one key pair|do not fit together"):
        check_key_pair(member_context, context_from_bytes(other_server, source="other", private=False))


def test_the_key_pair_check_tolerates_the_noise_of_the_smallest_scale():
    """At a 2^20 scale a fresh ciphertext is off by up to ~2e-3: one key pair must still pass, every time."""
    settings = HomomorphicEncryption(poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40], global_scale_bits=20)
    for _ in range(10):
        client, server = make_contexts(settings)
        member = context_from_bytes(client, source="client", private=True)
        check_key_pair(member, context_from_bytes(server, source="server", private=False))
    other = context_from_bytes(make_contexts(settings)[1], source="other", private=False)
    with pytest.raises(ValueError, match="not one key pair|do not fit together"):
        check_key_pair(member, other)


def test_packing_is_dense_and_carries_no_context(members, member_context, he_contexts):
    weighted, meta = _weighted(members[0], 4.0)
    update = encrypt_update(member_context, weighted, meta=meta)
    trunk = update.sections["trunk"]
    assert trunk.layout.total == 8320 + 64 + 64 + 1024 + 16
    assert chunk_capacity(member_context) == 8192  # N=8192: two values in each of the 4096 slots
    assert len(trunk.chunks) == 2  # one ciphertext per 8192 values, not one per layer
    assert len(update.sections["head:os"].chunks) == 1
    # each chunk is a bare ciphertext: far smaller than the public context NVFlare's FOBS attaches to each
    assert max(len(c) for s in update.sections.values() for c in s.chunks) < len(he_contexts[1]) / 2
    # seeded symmetric ciphertexts: one 60-bit polynomial (+ a seed) per 8192 values, i.e. ~8 bytes a value;
    # a public-key TenSEAL vector of the same chunk takes ~32 bytes a value
    assert 7.5 < len(trunk.chunks[0]) / 8192 < 8.5


def test_values_that_could_overflow_the_modulus_are_refused(member_context):
    limit = headroom(member_context) / MAX_CONTRIBUTORS
    assert limit == 2.0 ** (60 - 40 - 1) / 64  # data prime 60 bits, scale 2^40
    weighted, meta = weighted_update({"trunk.0.weight": np.array([1.0, -2.0])}, weights={"trunk": limit / 1.5})
    with pytest.raises(ValueError, match=r"section 'trunk': max \|value\| .* exceeds .* share of the CKKS headroom"):
        encrypt_update(member_context, weighted, meta=meta)
    fine, meta = weighted_update({"trunk.0.weight": np.array([1.0, -2.0])}, weights={"trunk": limit / 4})
    encrypt_update(member_context, fine, meta=meta)
    # the two values of a slot count together: each alone is under the limit, the slot |1 + 1i| = 1.41 is not
    pair, meta = weighted_update({"trunk.0.weight": np.array([1.0, 1.0])}, weights={"trunk": limit / 1.2})
    with pytest.raises(ValueError, match=r"max \|value\| .* \(a slot's \|re \+ i im\|"):
        encrypt_update(member_context, pair, meta=meta)


def test_a_sum_of_the_most_members_at_the_limit_decrypts_without_wrapping(member_context, server_context):
    """MAX_CONTRIBUTORS members just under their share of the headroom; a little over it, the sum wraps.

    A chunk of equal real slots is the worst case: its plaintext is one constant coefficient of value x scale.
    """

    def summed_chunk(value: float, *, guarded: bool) -> np.ndarray:
        slots = member_context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
        values = np.concatenate([np.full(slots, value), np.zeros(slots)])  # real parts only
        weighted, meta = weighted_update({"trunk.0.weight": values}, weights={"trunk": 1.0})
        if guarded:
            chunks = encrypt_update(member_context, weighted, meta=meta).sections["trunk"].chunks
        else:
            chunks = encrypt_flat(member_context, weighted["trunk.0.weight"])
        total = None
        for _ in range(MAX_CONTRIBUTORS):
            total = add_into(server_context, total, load_chunks(server_context, chunks))
        return decrypt_flat(member_context, serialize_chunks(total), n_values=values.size)[:slots]

    limit = headroom(member_context) / MAX_CONTRIBUTORS
    np.testing.assert_allclose(summed_chunk(0.99 * limit, guarded=True), MAX_CONTRIBUTORS * 0.99 * limit, rtol=1e-9)
    wrapped = summed_chunk(1.05 * limit, guarded=False)  # what the guard refuses would decrypt to garbage
    assert np.max(np.abs(wrapped - MAX_CONTRIBUTORS * 1.05 * limit)) > limit


def test_values_are_packed_two_to_a_slot():
    values = np.arange(7.0)
    slots = pack_slots(values)
    assert slots.tolist() == [0 + 4j, 1 + 5j, 2 + 6j, 3 + 0j]
    assert np.array_equal(unpack_slots(slots, n_values=7), values)
    assert slot_peak(np.array([3.0, 0.0, 4.0, 0.0]), capacity=4) == 5.0  # |3 + 4i|
    assert slot_peak(np.array([3.0, 0.0, 4.0, 0.0]), capacity=2) == 4.0  # two chunks: 3 + 0i, 4 + 0i


def test_a_chunk_from_other_parameters_or_garbage_is_refused(member_context, server_context):
    other_client, _ = make_contexts(
        HomomorphicEncryption(poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20], global_scale_bits=20)
    )
    other = context_from_bytes(other_client, source="other", private=True)
    weighted, meta = weighted_update({"trunk.0.bias": np.ones(3)}, weights={"trunk": 1.0})
    foreign = encrypt_update(other, weighted, meta=meta)
    with pytest.raises(ValueError, match="ciphertext chunk 0 is not a CKKS ciphertext of this key ceremony"):
        CiphertextSum(server_context).add(foreign)
    garbage = encrypt_update(member_context, weighted, meta=meta)
    garbage.sections["trunk"].chunks[0] = b"\x00" * 200
    with pytest.raises(ValueError, match="ciphertext chunk 0 is not a CKKS ciphertext"):
        CiphertextSum(server_context).add(garbage)

    # a damaged second section is refused before the first section's sum changes
    both, meta = weighted_update(
        {"trunk.0.bias": np.ones(3), "heads.os.0.bias": np.ones(2)}, weights={"trunk": 1.0, "head:os": 1.0}
    )
    summed = CiphertextSum(server_context)
    summed.add(encrypt_update(member_context, both, meta=meta))
    damaged = encrypt_update(member_context, both, meta=meta)
    damaged.sections["head:os"].chunks[0] = b"\x00" * 200
    with pytest.raises(ValueError, match="ciphertext chunk 0 is not a CKKS ciphertext"):
        summed.add(damaged)
    plain = decrypt_update(member_context, summed.result())
    np.testing.assert_allclose(plain["trunk.0.bias"], np.ones(3), atol=1e-6)


def test_a_larger_first_prime_gives_more_headroom():
    small = context_from_bytes(
        make_contexts(HomomorphicEncryption(coeff_mod_bit_sizes=[50, 40]))[1], source="s", private=False
    )
    assert headroom(small) == 2.0 ** (50 - 40 - 1)


def test_encrypt_refuses_keys_outside_the_described_sections(member_context):
    weighted, meta = weighted_update({"trunk.0.bias": np.ones(3)}, weights={"trunk": 2.0})
    with pytest.raises(ValueError, match=r"keys \['heads.secret.0.bias'\] belong to no described section"):
        encrypt_update(member_context, {**weighted, "heads.secret.0.bias": np.ones(2)}, meta=meta)
    with pytest.raises(ValueError, match="has no 'consortium_sections' meta"):
        encrypt_update(member_context, weighted, meta={})


def test_mismatched_layouts_are_not_added(member_context, server_context):
    summed = CiphertextSum(server_context)
    base = {"trunk.0.weight": np.ones((4, 3)), "trunk.0.bias": np.ones(4)}
    weighted, meta = weighted_update(base, weights={"trunk": 1.0})
    summed.add(encrypt_update(member_context, weighted, meta=meta))

    fewer = {"trunk.0.weight": np.ones((4, 3))}
    weighted, meta = weighted_update(fewer, weights={"trunk": 1.0})
    with pytest.raises(ValueError, match="section 'trunk' arrives with other keys or reduction than before"):
        summed.add(encrypt_update(member_context, weighted, meta=meta))

    reshaped = {"trunk.0.weight": np.ones((3, 4)), "trunk.0.bias": np.ones(4)}  # same keys and size, other shapes
    weighted, meta = weighted_update(reshaped, weights={"trunk": 1.0})
    with pytest.raises(ValueError, match="section 'trunk': layout differs from the first contribution's"):
        summed.add(encrypt_update(member_context, weighted, meta=meta))

    # a refused update leaves the sum as it was: one contribution of weight 1
    assert summed.result().described["trunk"].contributors == 1


def test_an_empty_sum_has_no_result(server_context):
    with pytest.raises(ValueError, match="no encrypted contribution was accepted this round"):
        CiphertextSum(server_context).result()


def test_wire_format_round_trip(members, member_context):
    weighted, meta = _weighted(members[0], 4.0)
    update = encrypt_update(member_context, weighted, meta={**meta, "NUM_STEPS_CURRENT_ROUND": 4})
    dxo = update.to_dxo()
    assert dxo.data_kind == DataKind.APP_DEFINED and is_encrypted_dxo(dxo)
    again = EncryptedUpdate.from_dxo(dxo)
    assert again.meta == {**meta, "NUM_STEPS_CURRENT_ROUND": 4}
    for name, section in update.sections.items():
        assert again.sections[name].chunks == section.chunks and again.sections[name].layout == section.layout
    plain = DXO(DataKind.WEIGHTS, data=weighted, meta=meta)
    assert not is_encrypted_dxo(plain)
    with pytest.raises(ValueError, match="is EncryptSections installed as the client's result filter"):
        EncryptedUpdate.from_dxo(plain)
    dxo.meta[SECTIONS_META] = {k: v for k, v in dxo.meta[SECTIONS_META].items() if k != "trunk"}
    with pytest.raises(ValueError, match=r"ciphertexts for \[.*'trunk'.*\], meta for"):
        EncryptedUpdate.from_dxo(dxo)


def test_layout_round_trip(members):
    flat, layout = flatten(members[0])
    again = Layout.from_meta(layout.to_meta())
    assert again == layout
    restored = unflatten(flat, again, dtype=np.float64)
    assert all(np.array_equal(restored[k], members[0][k]) for k in members[0])
    with pytest.raises(ValueError, match=r"layout repeats names: \['a', 'a'\]"):
        Layout.from_meta([["a", [1]], ["a", [2]]])
