"""The stored global aggregate: plaintext or ciphertext, read back exactly, a damaged file refused."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.he.payload import CiphertextSum, decrypt_update, encrypt_update
from jobs.sections import SECTIONS_META, finalize, weighted_update
from jobs.store import read_aggregate, write_aggregate


def _update(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {
        "trunk.0.weight": rng.normal(size=(70, 120)).astype(np.float32),  # 8400 values: two 8192-value chunks
        "trunk.0.bias": rng.normal(size=70),
        "heads.os.0.weight": rng.normal(size=(3, 70)),
        "stats.os.samples": np.full(80, 150.0),
    }
    return weighted_update(params, weights={"trunk": 9.0, "head:os": 9.0})


def test_plaintext_round_trip(tmp_path):
    params, meta = _update()
    size = write_aggregate(tmp_path / "agg", meta={**meta, "CURRENT_ROUND": 3}, params=params)
    assert size == 8 * sum(v.size for v in params.values())
    stored = read_aggregate(tmp_path / "agg")
    assert stored.encrypted is None
    assert stored.meta == {SECTIONS_META: meta[SECTIONS_META]}  # only the sections meta is kept
    assert list(stored.params) == list(params)
    for key, value in params.items():
        assert stored.params[key].dtype == np.float64 and np.array_equal(stored.params[key], value)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, then renamed


def test_encrypted_round_trip(tmp_path, member_context, server_context):
    params, meta = _update(1)
    summed = CiphertextSum(server_context)
    summed.add(encrypt_update(member_context, params, meta=meta))
    aggregate = summed.result()
    size = write_aggregate(tmp_path / "agg", meta=aggregate.meta, encrypted=aggregate)
    assert size == aggregate.n_bytes

    stored = read_aggregate(tmp_path / "agg")
    assert stored.params is None
    assert stored.meta[SECTIONS_META] == aggregate.meta[SECTIONS_META]
    for name, section in aggregate.sections.items():
        assert stored.encrypted.sections[name].chunks == section.chunks
        assert stored.encrypted.sections[name].layout == section.layout
    assert len(stored.encrypted.sections["trunk"].chunks) == 2
    plain = finalize(decrypt_update(member_context, stored.encrypted), stored.meta)
    expected = finalize(params, meta)
    assert max(np.max(np.abs(plain[k] - expected[k])) for k in expected if not k.startswith("stats.")) < 1e-6
    np.testing.assert_allclose(plain["stats.os.samples"], expected["stats.os.samples"], rtol=1e-6)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_truncated_or_padded_file_is_refused(tmp_path, member_context, encrypted):
    params, meta = _update(2)
    if encrypted:
        write_aggregate(tmp_path / "agg", meta=meta, encrypted=encrypt_update(member_context, params, meta=meta))
    else:
        write_aggregate(tmp_path / "agg", meta=meta, params=params)
    data = (tmp_path / "agg").read_bytes()
    for cut, damaged in [(data[:-1], "bad-1"), (data[: len(data) // 2], "bad-half"), (data + b"\x00", "bad-padded")]:
        (tmp_path / damaged).write_bytes(cut)
        with pytest.raises(
            ValueError,
            match=rf"{damaged}: the file is truncated or corrupt; copy {damaged} from the "
            r"server again \(header announces \d+ payload bytes",
        ):
            read_aggregate(tmp_path / damaged)
    (tmp_path / "bad-header").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"bad-header: the file is truncated or corrupt.*header unreadable"):
        read_aggregate(tmp_path / "bad-header")


def test_other_files_and_arguments_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 a torch checkpoint")
    with pytest.raises(ValueError, match="model.pt: not a consortium aggregate; pick the job's model.pt from the"):
        read_aggregate(tmp_path / "model.pt")
    params, meta = _update()
    with pytest.raises(ValueError, match="give either plaintext params or an encrypted update"):
        write_aggregate(tmp_path / "agg", meta=meta)
    with pytest.raises(ValueError, match="give either plaintext params or an encrypted update"):
        write_aggregate(tmp_path / "agg", meta=meta, params=params, encrypted=object())
