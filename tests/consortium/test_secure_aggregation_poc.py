"""Secure aggregation on POC with HE: the operator and one member together read nothing of another member.

One real run: four members (min_members 3), the largest killed while it trains round 1. A curious
operator (tests/secagg_spies.py) keeps every ciphertext it receives; each member's own update is kept in
the clear before it leaves, as ground truth. Then, with a member's secret key:
- another member's round-0 ciphertext decrypts to noise: |correlation| with its true update < 0.02 over
  more than 100,000 values, and its residues pass a chi-square test of uniformity at 0.01;
- the round without the dead member completes through a second exchange, and that member's last
  ciphertext is still masked;
- the stored aggregate equals the sum of the contributors' true updates to the CKKS error (trunk,
  statistics, attribution).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import consortium.run_job as run_job
from consortium.cli import main
from consortium.commands.synth import synthesize
from consortium.processes import signal_processes_under, stop_processes_under
from jobs.he.context import context_from_bytes
from jobs.he.masks import data_moduli
from jobs.he.packing import Layout, decrypt_flat
from jobs.he.payload import decrypt_update
from jobs.sections import section_of
from jobs.store import read_aggregate
from tests.helpers import free_ports, poc_kit, relocated_config, updates_received, wait_until
from tests.jobs.test_masks_ckks import decrypted_coefficients, residue_uniformity_p
from tests.secagg_spies import spying

pytestmark = [pytest.mark.slow, pytest.mark.fault]

MEMBERS = ("pharma-a", "pharma-b", "pharma-c", "pharma-d")
VICTIM, DEAD = "pharma-b", "pharma-d"


def _kill_while_training(flare: Path, done: threading.Event, killed: dict) -> None:
    """Kill the slowest member once the others sent round 1 and it has not (it is training round 1)."""
    others = [m for m in MEMBERS if m != DEAD]
    ready = wait_until(
        lambda: all(updates_received(flare, m) >= 2 for m in others), timeout=600, interval=0.05,
        what="the other members' round-1 updates", stop=done,
    )  # fmt: skip
    if not ready:
        return
    killed["updates_before"] = updates_received(flare, DEAD)
    kit = wait_until(lambda: poc_kit(flare, DEAD), timeout=60, interval=0.01, what="the member's kit")
    signal_processes_under(kit, signal.SIGKILL)
    killed["done"] = True
    stop_processes_under(kit)


def _plain(spy: Path, member: str, round_: int) -> dict[str, np.ndarray]:
    folder = spy / "plain" / f"{member}-r{round_}"
    return {path.stem: np.load(path) for path in folder.glob("*.npy")}


def _received_trunk(spy: Path, member: str, round_: int) -> tuple[list[bytes], Layout]:
    folder = spy / "received" / f"{member}-r{round_}-0"
    chunks = sorted(folder.glob("trunk-*.bin"), key=lambda p: int(p.stem.split("-")[1]))
    layout = Layout.from_meta(json.loads((folder / "trunk.layout.json").read_text()))
    return [p.read_bytes() for p in chunks], layout


def test_operator_and_a_member_read_nothing_of_another_member(tmp_path: Path, monkeypatch, capsys):
    data = synthesize(tmp_path / "data", sizes=[120, 140, 160, 2400], n_features=400, seed=5, shared=("response",))
    fl_port, admin_port = free_ports(2)
    config = relocated_config(
        data, tmp_path, operator={"fl_port": fl_port, "admin_port": admin_port},
        training={"rounds": 3, "min_members": 3, "round_deadline": 25},
    )  # fmt: skip
    spy, out = tmp_path / "spy", tmp_path / "run"
    monkeypatch.setattr(run_job, "build_recipe", spying(run_job.build_recipe, spy))
    done, killed = threading.Event(), {}
    crash = threading.Thread(target=_kill_while_training, args=(out / "flare", done, killed), daemon=True)
    crash.start()
    try:
        code = main(["run", "--config", str(config), "--env", "poc", "--he", "--out", str(out)])
    finally:
        done.set()
        crash.join(timeout=60)
        stop_processes_under(out / "flare")
    assert killed.get("done"), "the run ended before the slow member was killed"
    assert killed["updates_before"] == 1, f"{DEAD} had sent round 1 before it was killed; nothing to miss"
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["secure_aggregation"]["enabled"] is True
    assert set(report["dropped"]) == {DEAD}

    secret = context_from_bytes((out / "he_keys" / "client_context.tenseal").read_bytes(), source="k", private=True)

    # the operator with pharma-a's secret key reads pharma-b's round-0 trunk: noise
    chunks, layout = _received_trunk(spy, VICTIM, 0)
    truth = np.concatenate([_plain(spy, VICTIM, 0)[name].ravel() for name in layout.names])
    read = decrypt_flat(secret, chunks, n_values=layout.total)
    assert read.size >= 100_000
    correlation = float(np.corrcoef(read, truth)[0, 1])
    assert abs(correlation) < 0.02
    # its residues are uniform: a chi-square p-value is uniform under that null, so one ciphertext would fail
    # 1% of runs by chance; three members' ciphertexts, at most one below 0.01 (by chance: 3e-4 of runs)
    (prime,) = data_moduli(secret).tolist()
    p_values = [
        residue_uniformity_p(decrypted_coefficients(secret, _received_trunk(spy, member, 0)[0]), prime)
        for member in ("pharma-b", "pharma-c", "pharma-d")
    ]
    with capsys.disabled():
        print(f"\noperator + member read a masked ciphertext: corr {correlation:+.4f}, chi-square p {p_values}")
    assert sorted(p_values)[1] > 0.01

    # the dead member's last ciphertext (round 0) is still masked
    chunks, layout = _received_trunk(spy, DEAD, 0)
    dead_truth = np.concatenate([_plain(spy, DEAD, 0)[name].ravel() for name in layout.names])
    dead_read = decrypt_flat(secret, chunks, n_values=layout.total)
    assert abs(np.corrcoef(dead_read, dead_truth)[0, 1]) < 0.02
    assert np.median(np.abs(dead_read - dead_truth)) > 1e3

    # rounds 1-2 went on without it through a second exchange
    logs = (out / "flare").rglob("log.txt")
    member_log = "\n".join(p.read_text(errors="replace") for p in logs if VICTIM in p.parts)
    assert "round 1: update masked again for exchange 1" in member_log

    # the stored aggregate (round 2: three contributors) is the sum of their true updates, to CKKS error
    stored = read_aggregate(next(out.glob("**/FL_global_model.sections")))
    opened = decrypt_update(secret, stored.encrypted)
    contributors = [m for m in MEMBERS if m != DEAD]
    truths = [_plain(spy, m, 2) for m in contributors]
    errors: dict[str, list[float]] = {}
    for key, value in opened.items():
        exact = sum(t[key] for t in truths if key in t)
        section = section_of(key)[0]
        errors.setdefault(section, [0.0, 0.0])
        errors[section][0] = max(errors[section][0], float(np.max(np.abs(value - exact))))
        errors[section][1] = max(errors[section][1], float(np.max(np.abs(exact))))
    relative = {section: error / scale for section, (error, scale) in errors.items()}
    with capsys.disabled():
        print(f"masked aggregate against the true sum, worst relative error per section: {max(relative.values()):.2e}")
    assert all(error < 1e-6 for error in relative.values()), relative  # CKKS error, relative to a section's scale
    assert {"trunk", "stats:response", "consensus:response"} <= set(relative)
