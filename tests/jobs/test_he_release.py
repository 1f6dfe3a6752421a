"""A member decrypts the stored final aggregate into a trunk that loads into models.SharedTrunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.he.context import CLIENT_CONTEXT_FILE, context_from_bytes, make_contexts
from jobs.he.payload import CiphertextSum, encrypt_update
from jobs.he.release import decrypt_global_trunk
from jobs.he.store import write_encrypted_aggregate
from jobs.runner import FederatedRun
from models.network import SharedTrunk


class _Config:
    class _Member:
        name = "m1"

    members = [_Member()]


def _run(tmp_path: Path, *, global_model: Path | None, kits: dict[str, Path]) -> FederatedRun:
    return FederatedRun(
        job_id="job-1", env="poc", out=tmp_path, result_dir=tmp_path, global_model=global_model,
        site_outputs={}, tracking_uri="", seconds=0.0, rounds=1, he=True, kits=kits,
    )  # fmt: skip


def test_member_decrypts_the_stored_trunk(tmp_path):
    client, server = make_contexts()
    member = context_from_bytes(client, source="client", private=True)
    trunks = [SharedTrunk(30, trunk_widths=[8, 4], seed=s).state_dict() for s in (1, 2)]
    total = CiphertextSum(context_from_bytes(server, source="server", private=False))
    for trunk, steps in zip(trunks, (3, 9), strict=True):
        total.add(encrypt_update(member, {k: v.numpy() for k, v in trunk.items()}, weight=steps))
    write_encrypted_aggregate(tmp_path / "FL_global_model.ckks", total.result())
    (tmp_path / "kit" / "startup").mkdir(parents=True)
    (tmp_path / "kit" / "startup" / CLIENT_CONTEXT_FILE).write_bytes(client)

    state = decrypt_global_trunk(
        _Config(), _run(tmp_path, global_model=tmp_path / "FL_global_model.ckks", kits={"m1": tmp_path / "kit"})
    )
    model = SharedTrunk(30, trunk_widths=[8, 4])
    model.load_state_dict(state)
    for key, value in state.items():
        expected = (3 * trunks[0][key].double() + 9 * trunks[1][key].double()) / 12
        assert value.dtype == torch.float32
        assert torch.max(torch.abs(value.double() - expected)).item() < 1e-6


def test_missing_aggregate_or_kit_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="FL_global_model.ckks"):
        decrypt_global_trunk(_Config(), _run(tmp_path, global_model=None, kits={}))
    (tmp_path / "agg.ckks").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="pass client_context"):
        decrypt_global_trunk(_Config(), _run(tmp_path, global_model=tmp_path / "agg.ckks", kits={}))
