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

from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from consortium.registry import ConsortiumModel, ScoringInputError, pooled_scaling
from jobs.member_data import load_member, scaling_pieces, task_specs
from omics.io import read_member
from tests.helpers import release_random_model


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    cfg = synthesize(folder / "c", sizes=[120, 150], n_features=120, seed=3, rounds=1)
    # the survival and regression endpoints shared by both members
    made = release_random_model(cfg, folder / "out", shared={"survival": "pfs", "regression": "marker"})
    return made


@pytest.fixture(scope="module")
def consortium(released):
    return released["config"]


def test_the_registered_model_scores_a_members_raw_file_as_in_training(consortium, released):
    model, report, uri = released["model"], released["report"], released["uri"]
    assert report["tracking"]["registered_model"] == f"models:/{consortium.name}/1"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(report["tracking"]["registered_model"])
    panel = consortium.panel_features()
    assert loaded.metadata.get_input_schema().input_names() == [*panel, "library_size"]
    assert loaded.metadata.get_output_schema().input_names() == ["marker", "pfs"]

    member = consortium.members[0]
    adata = read_member(member.data)
    frame = adata[:, panel].to_df()  # raw counts, as the member's file holds them
    scaling = str(released["scaling"][member.name])
    scores = loaded.predict(frame, params={"scaling": scaling})
    assert list(scores.columns) == ["marker", "pfs"] and len(scores) == adata.n_obs

    # the trunk and the shared heads on the member's data exactly as its site normalized it in training
    trained = load_member(consortium, member.name).data.X
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(trained))  # the scaled rows the site's network read
        pfs = model.forward_task(x, "pfs").double().numpy()
        marker = model.forward_task(x, "marker").double().numpy() * 2.0 + 5.0  # the member's target units
    np.testing.assert_allclose(scores["pfs"].to_numpy(), pfs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores["marker"].to_numpy(), marker, rtol=0, atol=1e-6)

    # one sample alone scores as it does among all of them
    alone = loaded.predict(frame.iloc[[3]], params={"scaling": scaling})
    np.testing.assert_allclose(alone.to_numpy(), scores.iloc[[3]].to_numpy(), rtol=0, atol=1e-6)


def test_the_registered_model_names_what_it_cannot_score(consortium, released):
    mlflow.set_tracking_uri(released["uri"])
    loaded = mlflow.pyfunc.load_model(released["report"]["tracking"]["registered_model"])
    member = consortium.members[0]
    frame = read_member(member.data)[:, consortium.panel_features()].to_df().iloc[:2]
    scaling = {"scaling": str(released["scaling"][member.name])}
    with pytest.raises(ScoringInputError, match="the member's own training statistics"):
        loaded.predict(frame)
    first = frame.columns[0]
    with pytest.raises(ScoringInputError, match=f"column '{first}' is -1 for sample '{frame.index[0]}'.*raw counts"):
        loaded.predict(frame.assign(**{first: [-1.0, 2.0]}), params=scaling)
    with pytest.raises(ScoringInputError, match=f"column '{first}' is nan for sample"):
        loaded.predict(frame.assign(**{first: [np.nan, 2.0]}), params=scaling)
    with pytest.raises(ScoringInputError, match=r"lacks 1 of the 120 panel features this member measures, e.g. \['"):
        loaded.predict(frame.drop(columns=[first]), params=scaling)


def test_member_runs_are_nested_under_the_release(consortium, released):
    run_id, uri = released["run_id"], released["uri"]
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
    report = released["report"]
    json.dumps(report)  # the report stays JSON
    assert report["tracking"]["registered_model"].startswith("models:/")


def test_the_pooled_scaling_is_the_members_training_splits_together(consortium):
    loaded = [load_member(consortium, m.name) for m in consortium.members]
    sums: dict[str, np.ndarray] = {}
    for member, loaded_member in zip(consortium.members, loaded, strict=True):  # what each site sends, summed
        pieces = scaling_pieces(
            loaded_member.data,
            loaded_member.log_expression,
            loaded_member.measured,
            tasks=task_specs(consortium, member.name),
            minimum=consortium.data.min_cell_count,
        )
        for key, value in pieces.items():
            sums[key] = sums.get(key, 0.0) + value
    pooled = pooled_scaling(sums, config=consortium)
    together = np.vstack([m.log_expression[m.data.split == "train"] for m in loaded])
    measured = np.array(pooled["measured"])
    assert measured.all()  # every panel feature is measured by someone
    # features one member lacks are pooled over the members that measure them
    lacking = ~loaded[1].measured
    assert lacking.any()
    first = int((loaded[0].data.split == "train").sum())  # pharma-a's rows come first in ``together``
    np.testing.assert_allclose(
        np.array(pooled["mean"])[lacking], together[:first, lacking].mean(axis=0), rtol=1e-5, atol=1e-6
    )
    full = loaded[1].measured
    np.testing.assert_allclose(np.array(pooled["mean"])[full], together[:, full].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.array(pooled["std"])[full], together[:, full].std(axis=0, ddof=1), rtol=1e-4, atol=1e-6
    )

    labels = np.concatenate([m.data.targets["marker"][m.data.split == "train"] for m in loaded])
    labels = labels[np.isfinite(labels)]
    assert pooled["targets"]["marker"]["mean"] == pytest.approx(labels.mean(), rel=1e-9)
    assert pooled["targets"]["marker"]["scale"] == pytest.approx(labels.std(ddof=1), rel=1e-9)

    # a scorer with no scaling of its own gets the pooled one
    model = ConsortiumModel()
    model.spec = {"features": consortium.panel_features(), "consortium": consortium.name, "pooled_scaling": pooled}
    assert model.scaling(None) is pooled
    assert pooled_scaling({}, config=consortium) is None
