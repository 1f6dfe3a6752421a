"""`consortium run --folds K`: K federated jobs over a stratified K-fold partition, every sample tested once."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from consortium.cli import main
from schema.config import load_config


def test_more_folds_than_the_smallest_class_is_refused_before_anything_is_written(small_config_dict, tmp_path, capsys):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    adata.obs["response"] = (np.arange(adata.n_obs) < 6).astype(float)  # 6 positives
    adata.write_h5ad(tmp_path / "m.h5ad")
    config = tmp_path / "consortium.yaml"
    config.write_text(yaml.safe_dump(small_config_dict))
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out), "--folds", "10"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--folds 10" in err and "'resp'" in err and "smallest class" in err and "--folds 6 or fewer" in err
    assert not out.exists()


@pytest.mark.slow
def test_two_folds_two_seeds_test_every_labelled_sample_once(tiny_consortium: Path, tmp_path: Path):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--config",
            str(tiny_consortium),
            "--env",
            "sim",
            "--no-he",
            "--out",
            str(out),
            "--folds",
            "2",
            "--seeds",
            "2",
            "--rounds",
            "1",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["folds"] == 2 and len(report["job_ids"]) == 2 and len(set(report["job_ids"])) == 2
    # what is released is stated: the last fold's job, not a refit on every sample
    assert report["release"]["fold"] == 1 and report["release"]["job_id"] == report["job_ids"][-1]
    assert "fold 2 of 2" in report["release"]["source"] and "no refit" in report["release"]["source"]
    assert "released model and biomarker tables: fold 2 of 2" in (out / "report.md").read_text()
    seeds = report["seeds"]
    assert seeds["n"] == 2
    for tasks in seeds["paired_differences"].values():
        for diffs in tasks.values():
            for diff in diffs.values():
                assert len(diff["values"]) == 2 and diff["mean"] == pytest.approx(np.mean(diff["values"]))
    assert "over 2 seeds" in (out / "report.md").read_text()
    config = load_config(tiny_consortium)
    for member in config.members:
        obs = ad.read_h5ad(member.data, backed="r").obs
        for task in member.tasks:
            entry = report["members"][member.name]["tasks"][task.name]
            columns = [task.time, task.event] if task.type == "survival" else [task.column]
            labelled = int(obs[columns].notna().all(axis=1).sum())
            assert entry["n_test"] == labelled  # out of fold: every labelled sample is a test sample once
            low, high = entry["ci"]["federated"]
            assert low <= entry["federated"] <= high
    for name, endpoint in report["endpoints"].items():
        assert endpoint["federated"] is not None and np.isfinite(endpoint["federated"]), name
