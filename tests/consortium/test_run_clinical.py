"""panel.clinical end to end: `consortium data check` refuses what a declaration does not allow (exit 1,
naming the file, the column and the fix), and two real 2-round simulator runs (omics panel plus clinical
inputs, and clinical inputs alone) rank the clinical inputs by their column and score new samples."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from consortium.cli import main
from consortium.commands.synth import synthesize
from consortium.registry import ScoringInputError, clinical_input, model_spec, pooled_scaling
from consortium.scoring import _predict_prepared, default_scaling, held_out_samples
from jobs.member_data import load_member
from omics.io import read_member, write_member
from schema.config import load_config

CLINICAL = [
    {"column": "age", "type": "numeric", "range": [18, 110], "missing": "indicator"},
    {"column": "sex", "type": "categorical", "levels": ["F", "M"]},
]
INPUTS = ["age", "age (missing)", "sex=F", "sex=M"]


def _write(folder: Path, raw: dict, name: str) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("column", "values", "declared", "message", "fix"),
    [
        ("sex", ["F", "M", "U", "M"] * 20, CLINICAL[1], "levels ['U'] in 20 samples", "add them to the levels"),
        ("age", [17.0, 40.0, 50.0, 60.0] * 20, CLINICAL[0], "20 values outside the declared range [18, 110]", "widen"),
        ("age", ["40", "old", "50", "60"] * 20, CLINICAL[0], "20 non-numeric values, e.g. ['old']", "as numbers"),
        ("sex", ["F", None, "M", "M"] * 20, CLINICAL[1], "20 missing values and declares missing: refuse", "indicator"),
        ("age", None, {"column": "bmi", "type": "numeric"}, "needs column 'bmi' in obs", "add 'bmi'"),
    ],
)
def test_data_check_refuses_a_value_the_declaration_does_not_allow(
    tmp_path, small_adata, small_config_dict, capsys, column, values, declared, message, fix
):
    adata = small_adata.copy()
    adata.obs["age"] = np.linspace(20, 90, adata.n_obs)
    adata.obs["sex"] = ["F", "M"] * (adata.n_obs // 2)
    if values is not None:
        adata.obs[column] = values
    adata.write_h5ad(tmp_path / "m.h5ad")
    config = _write(tmp_path, {**small_config_dict, "panel": {"clinical": [declared]}}, "consortium.yaml")
    code = main(["data", "check", "--config", str(config), "--member", "m1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["fit"]
    assert report["path"] == str(tmp_path / "m.h5ad")
    [finding] = [f for f in report["findings"] if f["level"] == "error"]
    assert finding["field"] == f"obs.{declared['column']}"
    assert message in finding["message"] and fix in finding["fix"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> dict[str, Path]:
    """Two small members sharing 'response' whose sex drives the response (F mostly responds) and whose
    age follows the marker; a few ages missing. Two configs: the omics panel plus clinical inputs, and
    the clinical inputs alone."""
    folder = tmp_path_factory.mktemp("clinical")
    cfg = synthesize(folder, sizes=[120, 150], n_features=120, seed=3, rounds=2, shared=("response",))
    rng = np.random.default_rng(0)
    for member in load_config(cfg).members:
        adata = read_member(member.data)
        response = adata.obs["response"].to_numpy()
        flip = rng.random(adata.n_obs) < 0.1
        female = np.where(np.isnan(response), rng.random(adata.n_obs) < 0.5, (response == 1) != flip)
        adata.obs["sex"] = np.where(female, "F", "M")
        marker = adata.obs["marker_level"].fillna(0.0).to_numpy()
        age = (60 + 8 * marker + rng.normal(0, 2, adata.n_obs)).clip(20, 100)
        age[:4] = np.nan
        adata.obs["age"] = age
        write_member(adata, member.data)
    raw = yaml.safe_load(cfg.read_text())
    raw["panel"]["clinical"] = CLINICAL
    raw["privacy"] = {"he": {"enabled": False}}
    raw["statistics"] = {}
    both = _write(folder, raw, "with_clinical.yaml")
    alone = _write(folder, {**raw, "panel": {"clinical": CLINICAL}}, "clinical_only.yaml")
    return {"both": both, "alone": alone, "folder": folder}


def _run(config: Path, out: Path) -> dict:
    args = ["run", "--config", str(config), "--env", "sim", "--out", str(out), "--rounds", "2", "--no-he"]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_run_with_omics_and_clinical_inputs_ranks_them_by_column(consortium, tmp_path):
    report = _run(consortium["both"], tmp_path / "run")
    ranking = [row["feature"] for row in report["biomarkers"]["model"]["response"]]
    assert "sex=F" in ranking[:5], ranking[:10]  # the planted driver of the response
    marker = next(n for n in report["biomarkers"]["model"] if n.endswith("_marker"))
    assert "age" in [row["feature"] for row in report["biomarkers"]["model"][marker]][:10]
    statistics = report["biomarkers"]["statistics"]["response"]
    assert not {"age", "sex=F"} & {row["feature"] for row in statistics}  # statistics test omics features only
    scaling = json.loads((tmp_path / "run" / "sites" / "pharma-a" / "scaling.json").read_text())
    config = load_config(consortium["both"])
    assert scaling["features"] == config.model_features() and scaling["features"][-4:] == INPUTS
    assert scaling["std"][-3:] == [1.0, 1.0, 1.0] and scaling["mean"][-3:] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_a_clinical_only_run_trains_ranks_and_scores(consortium, tmp_path, capsys):
    config = load_config(consortium["alone"])
    assert config.panel_features() == [] and config.model_features() == INPUTS
    run = tmp_path / "run"
    report = _run(consortium["alone"], run)
    for name, rows in report["biomarkers"]["model"].items():
        assert sorted(row["feature"] for row in rows) == sorted(INPUTS), name
    assert report["biomarkers"]["model"]["response"][0]["feature"] in ("sex=F", "sex=M")
    assert not report["biomarkers"]["statistics"]
    capsys.readouterr()

    # the member scores its held-out samples with the registered model: as the site's model saw them
    held = held_out_samples(config, "pharma-a", out=tmp_path / "held.h5ad")
    argv = ["score", str(held), "--config", str(consortium["alone"]), "--member", "pharma-a", "--run", str(run)]
    assert main([*argv, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)["samples"]
    mlflow.set_tracking_uri(report["tracking"]["uri"])
    model = mlflow.pyfunc.load_model(report["tracking"]["registered_model"])
    assert model.metadata.get_input_schema().input_names() == ["age", "sex"]  # raw obs columns, encoded by it
    test = load_member(config, "pharma-a").data.subset("test")
    expected = _predict_prepared(model, test.X, scaling=default_scaling(run, "pharma-a"))["response"].to_numpy()
    np.testing.assert_allclose([scored[s]["response"] for s in read_member(held).obs_names], expected, atol=1e-6)

    # statistics test omics features: a panel without any is refused before anything runs
    code = main(["stats", "--config", str(consortium["alone"]), "--env", "sim", "--out", str(tmp_path / "s")])
    assert code == 2
    assert "consortium stats tests omics features, and panel declares none" in capsys.readouterr().err


def test_data_check_of_a_clinical_only_member_says_so(consortium, capsys):
    assert main(["data", "check", "--config", str(consortium["alone"]), "--member", "pharma-a"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "120 samples, clinical inputs only (no omics panel): fit to join" in first and "coverage" not in first
    assert main(["data", "check", "--config", str(consortium["both"]), "--member", "pharma-a"]) == 0
    assert "120 samples x 120 features, panel coverage 100.0%" in capsys.readouterr().out


def test_init_template_shows_clinical_inputs_commented_and_they_load(tmp_path):
    path = tmp_path / "consortium.yaml"
    assert main(["init", "--out", str(path)]) == 0
    text = path.read_text()
    assert "  # clinical:" in text and "#     levels: [F, M]" in text
    assert load_config(path).panel.clinical == []
    lines = [
        line.replace("  # ", "  ", 1) if line.startswith(("  # clinical:", "  #   ", "  #     ")) else line
        for line in text.splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")
    assert load_config(path).clinical_features() == INPUTS


def test_pooled_scaling_and_the_models_clinical_input(small_config_dict, tmp_path):
    clinical = [CLINICAL[0], {**CLINICAL[1], "missing": "indicator"}]
    raw = {**small_config_dict, "panel": {"features": ["GENE1", "GENE2"], "clinical": clinical}}
    config = load_config(_write(tmp_path, raw, "consortium.yaml"))
    # two members' summed pieces: GENE1, GENE2, then age (48 measured values), age (missing), sex=F, sex=M,
    # sex (missing): the level and indicator columns send their n only
    n, ages = 50.0, np.linspace(30, 77, 48)
    sums = {
        "scaling.features.samples": np.array([n, n, ages.size, n, n, n, n]),
        "scaling.features.sum": np.array([100.0, 150.0, ages.sum(), 0, 0, 0, 0]),
        "scaling.features.sumsq": np.array([250.0, 500.0, (ages**2).sum(), 0, 0, 0, 0]),
    }
    pooled = pooled_scaling(sums, config=config)
    assert pooled["features"] == ["GENE1", "GENE2", "age", "age (missing)", "sex=F", "sex=M", "sex (missing)"]
    assert pooled["mean"][2] == pytest.approx(ages.mean(), rel=1e-6)
    assert pooled["std"][2] == pytest.approx(ages.std(ddof=1), rel=1e-5)
    assert pooled["mean"][3:] == [0.0] * 4 and pooled["std"][3:] == [1.0] * 4 and all(pooled["measured"])

    spec = model_spec(config)
    assert spec["features"] == ["GENE1", "GENE2"] and spec["inputs"] == pooled["features"]
    frame = pd.DataFrame({"age": [pooled["mean"][2], np.nan, 90.0], "sex": ["F", None, "M"]})
    X = clinical_input(frame, spec=spec, scaling=pooled)
    np.testing.assert_allclose(X[:, 0], [0.0, 0.0, (90.0 - pooled["mean"][2]) / pooled["std"][2]], atol=1e-6)
    np.testing.assert_array_equal(X[:, 1:], [[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]])
    with pytest.raises(ScoringInputError, match=r"model input: obs.sex: .*levels \['U'\]"):
        clinical_input(frame.assign(sex=["F", "U", "M"]), spec=spec, scaling=pooled)
    with pytest.raises(ScoringInputError, match="needs column 'age'"):
        clinical_input(frame.drop(columns="age"), spec=spec, scaling=pooled)
