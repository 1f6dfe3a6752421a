"""Secure aggregation without HE, in the simulator: the operator receives masked words, and only their sum opens.

A curious operator (tests/secagg_spies.py) keeps every section it receives; each member's update is kept in
the clear before it leaves. No member's words are its update: they are uncorrelated with it, and the
stored sum equals the sum of the true updates within the stated quantization bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import consortium.run_job as run_job
from consortium.cli import main
from consortium.commands.synth import synthesize
from jobs.he.fixed_point import FRACTION_BITS, error_bound
from jobs.store import read_aggregate
from tests.helpers import relocated_config
from tests.secagg_spies import ShortListServer, spying

pytestmark = pytest.mark.slow

MEMBERS = ("pharma-a", "pharma-b", "pharma-c")


def _truth(spy: Path, member: str, round_: int) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in (spy / "plain" / f"{member}-r{round_}").glob("*.npy")}


def test_the_operator_reads_only_the_sum(tmp_path: Path, monkeypatch, capsys):
    data = synthesize(tmp_path / "data", sizes=[150, 200, 250], n_features=200, seed=7, shared=("response",))
    config = relocated_config(data, tmp_path, training={"rounds": 2})
    spy, out = tmp_path / "spy", tmp_path / "run"
    monkeypatch.setattr(run_job, "build_recipe", spying(run_job.build_recipe, spy))
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    masking = report["privacy"]["secure_aggregation"]
    assert masking["enabled"] is True and masking["quantization"]["fraction_bits"] == FRACTION_BITS

    correlations = []
    for member in MEMBERS:
        received = spy / "received" / f"{member}-r0-0"
        assert not list(received.glob("trunk.*.npy")), "a plaintext trunk reached the operator"
        words = np.load(received / "trunk.npy")
        truth = _truth(spy, member, 0)
        flat = np.concatenate([truth[k].ravel() for k in sorted(truth) if k.startswith("trunk.")])
        assert words.dtype == np.uint64 and words.size == flat.size >= 50_000
        as_read = words.view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS
        assert np.mean(np.abs(as_read - flat) < 1.0) < 1e-3  # no word is near its value
        correlations.append(abs(float(np.corrcoef(as_read, flat)[0, 1])))
    with capsys.disabled():
        print(f"\nmasked words against the members' trunks: |corr| {[round(c, 4) for c in correlations]}")
    assert max(correlations) < 0.02

    stored = read_aggregate(next(out.glob("flare/**/FL_global_model.sections")))
    truths = [_truth(spy, member, 1) for member in MEMBERS]
    kinds = set()
    for key, value in stored.params.items():
        exact = sum(t[key] for t in truths if key in t)
        assert float(np.max(np.abs(value - exact))) <= error_bound(len(MEMBERS)), key
        kinds.add(key.split(".", 1)[0])
    assert {"trunk", "heads", "stats", "consensus"} <= kinds


def test_members_refuse_a_round_of_two_and_the_error_names_why(tmp_path: Path, monkeypatch, capsys):
    """A server that lists two members (to isolate one with a colluder) gets no update: the job ends, naming it."""
    data = synthesize(tmp_path / "data", sizes=[120, 140, 160], n_features=144, seed=2)
    config = relocated_config(data, tmp_path, training={"rounds": 1, "round_deadline": 60})
    real = run_job.build_recipe

    def malicious(config, **kwargs):
        recipe = real(config, **kwargs)
        recipe.fed_job._deploy_map["server"].app_config.workflows[0].controller.__class__ = ShortListServer
        return recipe

    monkeypatch.setattr(run_job, "build_recipe", malicious)
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out)])
    said = capsys.readouterr()
    assert code == 1
    assert "MaskRefused" in said.err and "fewer than 3" in said.err, said.err[-3000:]
    assert not list(out.glob("flare/**/FL_global_model.sections"))  # no round was opened
