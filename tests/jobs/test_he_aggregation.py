"""Encrypt on two members, add on a server that holds only the public context, decrypt on a member."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from jobs.he.context import CKKSParameters, context_from_bytes, headroom, make_contexts, slot_count
from jobs.he.packing import Layout, flatten, unflatten
from jobs.he.payload import CiphertextSum, EncryptedUpdate, decrypt_average, encrypt_update, is_encrypted_dxo
from jobs.he.store import decrypt_aggregate_file, read_encrypted_aggregate, write_encrypted_aggregate

# Measured with these parameters (N=8192, [60, 40], scale 2^40): max abs error ~1e-9 on the
# weighted average of weights of order 1; the bound leaves three orders of magnitude of margin.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def contexts() -> tuple[bytes, bytes]:
    return make_contexts(CKKSParameters())


@pytest.fixture(scope="module")
def member(contexts) -> ts.Context:
    return context_from_bytes(contexts[0], source="client_context.tenseal", private=True)


@pytest.fixture(scope="module")
def server(contexts) -> ts.Context:
    return context_from_bytes(contexts[1], source="server_context.tenseal", private=False)


def _trunk(seed: int) -> dict[str, np.ndarray]:
    """A stand-in trunk whose 7k values span two CKKS chunks (4096 slots each)."""
    rng = np.random.default_rng(seed)
    return {
        "trunk.0.weight": rng.normal(scale=0.5, size=(64, 100)).astype(np.float32),
        "trunk.0.bias": rng.normal(scale=0.1, size=64).astype(np.float32),
        "trunk.1.weight": np.ones(64, dtype=np.float32),
        "trunk.4.weight": rng.normal(scale=0.5, size=(16, 64)).astype(np.float32),
        "trunk.4.bias": rng.normal(scale=0.1, size=16).astype(np.float32),
    }


def _fedavg(trunks: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    pairs = list(zip(trunks, weights, strict=True))
    return {k: sum(w * t[k].astype(np.float64) for t, w in pairs) / total for k in trunks[0]}


def test_server_context_is_public_and_cannot_decrypt(member, server):
    assert member.is_private()
    assert not server.is_private()
    update = encrypt_update(member, _trunk(0), weight=1.0)
    vector = ts.ckks_vector_from(server, update.chunks[0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()


def test_a_context_with_secret_key_is_refused_for_the_server(contexts):
    with pytest.raises(ValueError, match="holds a SECRET key"):
        context_from_bytes(contexts[0], source="server_context.tenseal", private=False)
    with pytest.raises(ValueError, match="holds no secret key"):
        context_from_bytes(contexts[1], source="client_context.tenseal", private=True)


def test_two_members_encrypted_fedavg_matches_plaintext(member, server):
    trunks, weights = [_trunk(1), _trunk(2)], [30.0, 50.0]
    updates = [encrypt_update(member, t, weight=w) for t, w in zip(trunks, weights, strict=True)]

    summed = CiphertextSum(server)  # the operator: public context, additions only
    for update in updates:
        summed.add(update)
    aggregate = summed.result()
    assert aggregate.weight == pytest.approx(80.0)
    assert aggregate.contributors == 2

    average = decrypt_average(member, aggregate)
    expected = _fedavg(trunks, weights)
    assert list(average) == list(expected)
    errors = [np.max(np.abs(average[k] - expected[k])) for k in expected]
    assert max(errors) < TOLERANCE
    assert all(average[k].shape == expected[k].shape and average[k].dtype == np.float32 for k in expected)


def test_aggregate_is_ciphertext(member, server):
    trunk = _trunk(3)
    summed = CiphertextSum(server)
    summed.add(encrypt_update(member, trunk, weight=1.0))
    aggregate = summed.result()
    flat, _ = flatten(trunk)
    assert len(aggregate.chunks) == -(-flat.size // slot_count(server)) == 2
    blob = b"".join(aggregate.chunks)
    for name, array in trunk.items():
        head = array.ravel()[:4]
        assert head.astype(np.float32).tobytes() not in blob, name
        assert head.astype(np.float64).tobytes() not in blob, name
    for chunk in aggregate.chunks:
        assert isinstance(ts.ckks_vector_from(server, chunk), ts.CKKSVector)
    assert is_encrypted_dxo(aggregate.to_dxo())


def test_packing_is_dense_and_carries_no_context(member, contexts):
    update = encrypt_update(member, _trunk(4), weight=2.0)
    flat, layout = flatten(_trunk(4))
    assert layout.total == flat.size == 6400 + 64 + 64 + 1024 + 16
    assert len(update.chunks) == 2  # one ciphertext per 4096 values, not one per layer
    # each chunk is a bare ciphertext: far smaller than the public context NVFlare's FOBS attaches to each
    assert max(len(c) for c in update.chunks) < len(contexts[1]) / 2


def test_layout_round_trip():
    trunk = _trunk(5)
    flat, layout = flatten(trunk)
    again = Layout.from_meta(layout.to_meta())
    assert again == layout
    restored = unflatten(flat, again)
    assert all(np.array_equal(restored[k], trunk[k]) for k in trunk)


def test_mismatched_layouts_are_not_added(member, server):
    summed = CiphertextSum(server)
    summed.add(encrypt_update(member, _trunk(6), weight=1.0))
    other = dict(_trunk(6))
    other.pop("trunk.4.bias")
    with pytest.raises(ValueError, match="same trunk keys"):
        summed.add(encrypt_update(member, other, weight=1.0))


def test_weights_that_could_overflow_the_modulus_are_refused(member):
    peak = headroom(member) / 64
    with pytest.raises(ValueError, match="CKKS headroom"):
        encrypt_update(member, {"w": np.array([1.0, 2.0])}, weight=peak)
    with pytest.raises(ValueError, match="positive"):
        encrypt_update(member, {"w": np.array([1.0])}, weight=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        encrypt_update(member, {"w": np.array([np.nan])}, weight=1.0)


def test_wire_format_round_trip(member):
    update = encrypt_update(member, _trunk(7), weight=4.0)
    update.meta = {"NUM_STEPS_CURRENT_ROUND": 4}
    again = EncryptedUpdate.from_dxo(update.to_dxo())
    assert again.chunks == update.chunks and again.layout == update.layout and again.weight == 4.0
    assert again.meta == {"NUM_STEPS_CURRENT_ROUND": 4}


def test_stored_aggregate_decrypts_for_a_member(tmp_path, member, server, contexts):
    summed = CiphertextSum(server)
    summed.add(encrypt_update(member, _trunk(8), weight=3.0))
    path = tmp_path / "FL_global_model.ckks"
    write_encrypted_aggregate(path, summed.result())
    assert read_encrypted_aggregate(path).weight == 3.0
    trunk = decrypt_aggregate_file(path, client_context=contexts[0])
    assert max(np.max(np.abs(trunk[k] - _trunk(8)[k])) for k in trunk) < TOLERANCE
    with pytest.raises(ValueError, match="holds no secret key"):
        decrypt_aggregate_file(path, client_context=contexts[1])


def test_parameters_without_room_above_the_scale_are_refused():
    with pytest.raises(ValueError, match="leave no room"):
        CKKSParameters(coeff_mod_bit_sizes=(40, 40), global_scale_bits=40)
