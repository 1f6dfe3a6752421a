"""The released model in the MLflow Model Registry, as its users load it, and ``consortium release``'s bad input.

No FLARE here: a shared state (trunk and shared heads) is released as a job would release it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from consortium.results import Released
from consortium.shared_model import log_shared_model, tracking_uri_for
from jobs.recipe import server_model
from models.network import SharedModel
from omics.io import read_member
from omics.normalize import normalize
from schema.config import load_config


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    cfg = synthesize(folder / "c", sizes=[60, 80], n_features=120, seed=3, rounds=1)
    raw = yaml.safe_load(cfg.read_text())
    for member in raw["members"]:  # the survival endpoint shared by both members
        for task in member["tasks"]:
            if task["type"] == "survival":
                task["name"] = "pfs"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(cfg)


@pytest.fixture(scope="module")
def released(consortium, tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    model = SharedModel(**{**server_model(consortium)["args"], "seed": 7}).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    report = {
        "job_id": "job-1",
        "privacy": {"he": True, "dp": False},
        "timing": {"rounds": 1},
        "env": "kits",
        "members": {},
        "tracking": {},
    }
    records = {
        m.name: [
            {"site": m.name, "round": 0, "train_loss": 1.5, "val": {"pfs": {"c_index": 0.6}}, "samples": {"train": 40}}
        ]
        for m in consortium.members
    }
    uri = tracking_uri_for(consortium, out=out)
    run_id = log_shared_model(
        consortium, Released(state=state), report=report, tracking_uri=uri, member_records=records
    )
    return model, report, run_id, uri


def test_the_registered_model_scores_a_members_raw_file(consortium, released):
    model, report, _, uri = released
    assert report["tracking"]["registered_model"] == f"models:/{consortium.name}/1"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(report["tracking"]["registered_model"])
    panel = consortium.panel_features()
    assert loaded.metadata.get_input_schema().input_names() == panel
    assert loaded.metadata.get_output_schema().input_names() == ["pfs"]

    member = consortium.members[0]
    adata = read_member(member.data)
    frame = adata[:, panel].to_df()  # raw counts, as the member's file holds them
    scores = loaded.predict(frame)
    assert list(scores.columns) == ["pfs"] and len(scores) == adata.n_obs
    assert np.isfinite(scores.to_numpy()).all()

    # the same as the trunk and the shared head on the data normalized as in training
    normalized = normalize(adata[:, panel].copy(), values="counts", copy=True)
    with torch.no_grad():
        expected = model.forward_task(torch.as_tensor(np.asarray(normalized.X, dtype=np.float32)), "pfs").numpy()
    np.testing.assert_allclose(scores["pfs"].to_numpy(), expected, rtol=1e-4, atol=1e-4)


def test_member_runs_are_nested_under_the_release(consortium, released):
    _, _, run_id, uri = released
    mlflow.set_tracking_uri(uri)
    children = mlflow.search_runs(
        experiment_names=[consortium.tracking.experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert sorted(children["tags.member"]) == sorted(m.name for m in consortium.members)
    assert set(children["params.samples_train"]) == {"40"}
    assert set(children["metrics.val/pfs/c_index"]) == {0.6}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(children.run_id.iloc[0], "published")}
    assert len(artifacts) == 1


def test_release_bad_input_names_the_option_and_the_fix(consortium, tmp_path, capsys):
    cfg = str(consortium.source)
    out = str(tmp_path / "out")
    assert cli(["release", "--config", cfg, "--job", "j", "--out", out]) == 2
    assert "give either --kit LEAD_KIT" in _flat(capsys.readouterr().err)

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    argv = ["release", "--config", cfg, "--job", "j", "--out", out, "--job-dir", str(job_dir)]
    assert cli([*argv, "--keys", str(tmp_path / "nokeys")]) == 2
    assert "no client_context.tenseal there; give the member key custodian's secret context" in _flat(
        capsys.readouterr().err
    )

    assert cli(argv) == 2
    assert "the server received nothing from any member" in _flat(capsys.readouterr().err)

    assert cli(["release", "--config", cfg, "--job", "j", "--out", out, "--kit", str(tmp_path)]) == 2
    assert "not an admin startup kit (no startup/ folder)" in _flat(capsys.readouterr().err)
    assert not Path(out).exists()  # nothing half-written


def test_report_json_names_the_registered_model(released):
    _, report, _, _ = released
    json.dumps(report)  # the report stays JSON
    assert report["tracking"]["registered_model"].startswith("models:/")
