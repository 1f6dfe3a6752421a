"""`consortium run --env poc --he`: real FLARE processes, the key ceremony, encrypted aggregation, release."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from consortium.audit import verify_log
from consortium.cli import main
from consortium.processes import stop_processes_under
from jobs.he.context import context_from_bytes
from jobs.store import read_aggregate

pytestmark = pytest.mark.slow


def test_he_run_on_poc_releases_a_decrypted_shared_model(tiny_consortium: Path, tmp_path: Path):
    out = tmp_path / "run"
    code = main(["run", "--config", str(tiny_consortium), "--env", "poc", "--out", str(out), "--rounds", "2", "--he"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["he"] is True and "CKKS N=8192" in report["privacy"]["he_scheme"]
    assert [r["round"] for r in report["rounds"]] == [0, 1]

    # the operator's side holds the public context only; the aggregate it stored is ciphertext
    public = (out / "he_keys" / "server_context.tenseal").read_bytes()
    assert not context_from_bytes(public, source="server", private=False).is_private()
    stored = next(out.glob("flare/**/FL_global_model.sections"))
    assert read_aggregate(stored).encrypted is not None  # the operator's server stored ciphertext only
    assert not list(out.glob("flare/**/localhost/startup/client_context.tenseal"))
    assert list(out.glob("flare/**/localhost/startup/server_context.tenseal"))

    # a member decrypted the aggregate, and the released trunk is a working model in MLflow
    mlflow.set_tracking_uri(report["tracking"]["uri"])
    model = mlflow.pytorch.load_model(f"runs:/{report['tracking']['model_run_id']}/shared_model")
    features = model(torch.randn(3, 200))
    assert features.shape == (3, 64) and torch.isfinite(features).all()

    audit = verify_log(out / "audit.jsonl")
    assert audit.ok
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events[0] == "keys_created" and "job_submitted" in events and events[-1] == "model_released"
    assert stop_processes_under(out / "flare") == 0  # no FLARE process outlives the run
