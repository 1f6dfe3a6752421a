"""The dropout and site-selection use cases on POC with HE: real FLARE processes on loopback, the key
ceremony, the members' clinical-only updates summed as CKKS ciphertext by the operator, then the shared
model released and a member scoring its own file with it (docs/use-cases.md, as a user types it)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from consortium.audit import verify_log
from consortium.cli import main
from consortium.processes import stop_processes_under
from consortium.use_case_truth import load_json, scores_against_truth
from jobs.store import read_aggregate
from tests.helpers import free_ports, relocated_config

pytestmark = pytest.mark.slow


def _poc_he_run(folder: Path, kind: str, *, sizes: str, rounds: int) -> tuple[Path, Path]:
    assert main(["synth", "--kind", kind, "--out", str(folder / "synth"), "--sizes", sizes, "--seed", "1"]) == 0
    fl_port, admin_port = free_ports(2)
    config = relocated_config(
        folder / "synth" / "consortium.yaml", folder, operator={"fl_port": fl_port, "admin_port": admin_port}
    )
    run = folder / "run"
    argv = ["run", "--config", str(config), "--env", "poc", "--he", "--out", str(run), "--rounds", str(rounds)]
    assert main(argv) == 0
    return config, run


def _assert_encrypted_and_audited(run: Path, report: dict) -> None:
    assert report["privacy"]["he"] is True
    stored = next(run.glob("flare/**/FL_global_model.sections"))
    assert read_aggregate(stored).encrypted is not None  # the operator stored the sum as ciphertext only
    assert not list(run.glob("flare/**/localhost/startup/client_context.tenseal"))  # and holds no secret key
    assert verify_log(run / "audit.jsonl").ok
    assert stop_processes_under(run / "flare") == 0


def _score(config: Path, run: Path, member: str, out: Path) -> pd.DataFrame:
    data = Path(config).parent / "synth" / f"{member}.current.h5ad"
    argv = ["score", str(data), "--config", str(config), "--member", member, "--run", str(run), "--out", str(out)]
    assert main(argv) == 0
    return pd.read_csv(out)


def test_dropout_risk_on_poc_with_he_ranks_current_patients_by_their_planted_risk(tmp_path: Path):
    config, run = _poc_he_run(tmp_path, "trial", sizes="200,300,500", rounds=3)
    report = load_json(run / "report.json")
    _assert_encrypted_and_audited(run, report)
    assert set(report["endpoints"]) == {"dropout", "discontinued"}
    truth = load_json(tmp_path / "synth" / "ground_truth.json")
    _score(config, run, "trial-a", tmp_path / "at_risk.csv")
    ranked = scores_against_truth(tmp_path / "at_risk.csv", truth, member="trial-a", column="dropout")
    assert ranked["spearman"] > 0.5, json.dumps(ranked)


def test_site_selection_on_poc_with_he_ranks_candidate_sites_by_their_true_rate(tmp_path: Path):
    config, run = _poc_he_run(tmp_path, "sites", sizes="200,300,500", rounds=4)
    report = load_json(run / "report.json")
    _assert_encrypted_and_audited(run, report)
    truth = load_json(tmp_path / "synth" / "ground_truth.json")
    _score(config, run, "sponsor-a", tmp_path / "candidates.csv")
    ranked = scores_against_truth(tmp_path / "candidates.csv", truth, member="sponsor-a", column="enrolled_per_month")
    assert ranked["spearman"] > 0.5, json.dumps(ranked)
