"""The declared design through the CLI: a member that cannot enter it, or a design that cannot be estimated
with member as a factor, is refused before anything runs, naming the member, the column and the fix."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import yaml

from consortium.cli import main


def _write(tmp_path, raw):
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _with_statistics(small_config_dict, **statistics):
    return dict(small_config_dict, statistics=statistics)


def _check(capsys, config):
    code = main(["data", "check", "--config", str(config), "--member", "m1", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_missing_covariate_column_is_named_with_its_fix(tmp_path, small_config_dict, capsys):
    config = _write(tmp_path, _with_statistics(small_config_dict, covariates={"age": "numeric"}))
    code, report = _check(capsys, config)
    assert code == 1 and not report["fit"]
    [finding] = [f for f in report["findings"] if f["field"].startswith("statistics")]
    assert "age" in finding["message"] and finding["fix"]


def test_a_level_the_config_does_not_declare_is_named(tmp_path, small_config_dict, capsys):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    adata.obs["sex"] = np.where(np.arange(adata.n_obs) % 3 == 0, "X", np.where(np.arange(adata.n_obs) % 2, "F", "M"))
    adata.write_h5ad(tmp_path / "m.h5ad")
    config = _write(tmp_path, _with_statistics(small_config_dict, covariates={"sex": ["F", "M"]}))
    code, report = _check(capsys, config)
    assert code == 1
    [finding] = [f for f in report["findings"] if f["field"].startswith("statistics")]
    assert "'X'" in finding["message"] and "declare" in finding["fix"]
    adata.obs["sex"] = np.where(np.arange(adata.n_obs) % 2, "F", "M")
    adata.write_h5ad(tmp_path / "m.h5ad")
    assert _check(capsys, config)[0] == 0


def test_a_formula_that_would_run_code_is_refused_on_load(tmp_path, small_config_dict, capsys):
    marker = tmp_path / "ran"
    formula = f"~ endpoint + {{__import__('os').system('touch {marker}')}}"
    config = _write(tmp_path, _with_statistics(small_config_dict, formula=formula))
    code = main(["data", "check", "--config", str(config), "--member", "m1"])
    captured = capsys.readouterr()
    assert code == 2 and "statistics.formula" in captured.err and not marker.exists()


def test_a_covariate_confounded_with_member_stops_the_run_before_anything_is_written(tiny_consortium, tmp_path, capsys):
    raw = yaml.safe_load(tiny_consortium.read_text())
    base = tiny_consortium.parent
    raw["panel"]["file"] = str(base / raw["panel"]["file"])
    for index, member in enumerate(raw["members"]):
        adata = ad.read_h5ad(base / member["data"])
        adata.obs["batch"] = f"b{index + 1}"  # each member one batch: batch is member
        member["data"] = str(tmp_path / f"m{index}.h5ad")
        adata.write_h5ad(member["data"])
    raw["statistics"] = {"covariates": {"age": "numeric", "batch": ["b1", "b2"]}}
    config = _write(tmp_path, raw)
    out = tmp_path / "out"
    code = main(["stats", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    message = " ".join((captured.out + captured.err).split())
    assert "cannot estimate ['batch[b2]']" in message and "statistics.covariates" in message
    assert not out.exists()
