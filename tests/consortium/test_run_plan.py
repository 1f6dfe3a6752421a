"""The run plan refuses a run that cannot be made as asked before anything is written or any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from consortium.cli import main
from consortium.run_options import PlanError, RunOptions
from consortium.run_plan import RunPlan
from schema.config import load_config


def _config(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "m.h5ad").unlink()  # no data: a data check reached would fail (exit 1), not the plan
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_with_an_unknown_env_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--env", "foo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--env 'foo'" in err and "'sim'" in err and "'poc'" in err
    assert not out.exists()  # no synthetic data, no run_state.json, no MLflow store, no baselines' process


def test_run_with_one_fold_writes_nothing(small_config_dict, tmp_path, capsys):
    config = _config(tmp_path, small_config_dict)
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out), "--folds", "1"])
    assert code == 2
    assert "--folds" in capsys.readouterr().err
    assert not out.exists()


def test_run_in_the_simulator_with_he_on_in_the_config_writes_nothing(small_config_dict, tmp_path, capsys):
    small_config_dict["privacy"] = {"he": {"enabled": True}}
    config = _config(tmp_path, small_config_dict)
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "HE is on" in err and "simulator" in err and "--env poc" in err and "--no-he" in err
    assert not out.exists()


def test_the_plan_lists_one_job_per_seed_and_fold(small_config_dict, tmp_path):
    config = load_config(_config(tmp_path, small_config_dict))
    plan = RunPlan.build(config, RunOptions(out=tmp_path / "run", env="sim", he=False, folds=2, seeds=2))
    jobs = plan.jobs()
    assert [(j.seed, j.fold, j.key) for j in jobs] == [
        (0, 0, "seed0-fold0"),
        (0, 1, "seed0-fold1"),
        (1, 0, "seed1-fold0"),
        (1, 1, "seed1-fold1"),
    ]
    assert jobs[0].config_file == tmp_path / "run" / "consortium.run.yaml"
    assert jobs[3].config_file == tmp_path / "run" / "consortium.seed1.yaml"
    assert jobs[3].outputs == tmp_path / "run" / "seed1" / "sites" / "fold1"
    assert plan.rounds == config.training.rounds and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"seeds": 0}, "--seeds 0"),
        ({"rounds": 0}, "--rounds 0"),
        ({"resume": True, "force": True}, "give one of them"),
        ({"resume": True}, "no run to resume"),
        ({"he": True}, "HE is on"),
    ],
)
def test_the_plan_names_what_it_refuses(small_config_dict, tmp_path, options, named):
    config = load_config(_config(tmp_path, small_config_dict))
    with pytest.raises(PlanError, match=named):
        RunPlan.build(config, RunOptions(**{"out": tmp_path / "run", "env": "sim", "he": False, **options}))
    assert not (tmp_path / "run").exists()
