"""What a newcomer trips on, through the CLI: flags shown as flags, non-count values refused with the layer that
holds the counts, the setting an identifier mismatch needs, a positive label suggested by meaning, a readable
split, a hint towards --folds, the job script's errors, the demo's ports."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from consortium.cli import command_line, main
from consortium.commands.init import set_operator_ports
from jobs import job
from omics.io import read_member
from schema.config import load_config
from schema.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path, raw):
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check_json(capsys, config, member="m1"):
    code = main(["data", "check", "--config", str(config), "--member", member, "--json"])
    return code, json.loads(capsys.readouterr().out)


def errors(report):
    return [f for f in report["findings"] if f["level"] == "error"]


def rewrite(tmp_path, change):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    change(adata)
    adata.write_h5ad(tmp_path / "m.h5ad")


# -- flags --------------------------------------------------------------------------------------------------


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_flag_shows_as_a_flag_in_help(capsys):
    shown = 0
    for path, _ in _commands(command_line()):
        assert main([*path, "--help"]) == 0
        out = capsys.readouterr().out
        assert "<bool>" not in out, (path, out)
        shown += "--help" in out
    assert shown > 10
    assert main(["run", "--help"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "--baselines" in line)
    assert row.split("--baselines")[1].split()[0] == "Also"  # the help text follows the flag, no value


def test_a_flag_given_a_value_is_refused_naming_the_value(tmp_path, small_config_dict, capsys):
    config = write_config(tmp_path, small_config_dict)
    assert main(["data", "check", "--config", str(config), "--member", "m1", "--json", "true"]) == 2
    err = capsys.readouterr().err
    assert "unexpected extra argument(s) (true)" in err
    assert "--json is a flag and takes no value: give '--json' alone, without 'true'" in err
    assert main(["--verbose", "true", "data", "check", "--config", str(config), "--member", "m1"]) == 2
    assert "--verbose is a flag and takes no value" in capsys.readouterr().err


# -- values: counts -----------------------------------------------------------------------------------------


def test_log_values_under_counts_are_refused_naming_the_counts_layer(tmp_path, small_config_dict, capsys):
    def log_normalized(adata):
        adata.layers["counts"] = adata.X.copy()
        adata.X = np.log1p(adata.X)

    rewrite(tmp_path, log_normalized)
    config = write_config(tmp_path, small_config_dict)
    code, report = check_json(capsys, config)
    assert code == 1
    (error,) = [f for f in errors(report) if f["field"] == "X"]
    first = float(np.log1p(ad.read_h5ad(tmp_path / "m.h5ad").layers["counts"][0, 0]))
    assert f"3200 values are not whole numbers (e.g. {first:.4g}, " in error["message"]
    assert "normalized twice" in error["message"]
    assert "layers['counts'] of the file holds the raw counts: set `layer: counts` for member 'm1'" in error["fix"]
    assert main(["data", "check", "--config", str(config), "--member", "m1"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "NOT fit to join" in out and "set `layer: counts`" in out
    small_config_dict["members"][0]["layer"] = "counts"  # the setting the fix names
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 0 and report["layout"]["matrix"] == "layers['counts']"


def test_negative_values_name_raw_when_raw_holds_the_counts(tmp_path, small_config_dict, capsys):
    def scaled(adata):
        adata.raw = adata.copy()
        adata.X = (adata.X - adata.X.mean(axis=0)) / adata.X.std(axis=0)

    rewrite(tmp_path, scaled)
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    (error,) = [f for f in errors(report) if f["field"] == "X"]
    assert "negative values" in error["message"] and "data.values: counts expects raw counts" in error["message"]
    assert "adata.raw of the file holds the raw counts: set `layer: raw` for member 'm1'" in error["fix"]


def test_non_counts_without_a_counts_layer_name_both_ways_out(tmp_path, small_config_dict, capsys):
    rewrite(tmp_path, lambda adata: setattr(adata, "X", adata.X + 0.5))
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    (error,) = [f for f in errors(report) if f["field"] == "X"]
    assert "round estimated counts" in error["fix"] and "set `data.values: normalized`" in error["fix"]
    small_config_dict["data"]["values"] = "normalized"
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 0, errors(report)


def test_the_run_refuses_non_counts_before_flare_starts(tmp_path, small_config_dict, capsys):
    rewrite(tmp_path, lambda adata: setattr(adata, "X", np.log1p(adata.X)))
    config = write_config(tmp_path, small_config_dict)
    run = ["run", "--config", str(config), "--out", str(tmp_path / "run"), "--env", "sim", "--no-he"]
    assert main([*run, "--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["started"] is False and result["unfit"] == ["m1"]
    (error,) = [f for f in errors(result["members"]["m1"]) if f["field"] == "X"]
    assert "values are not whole numbers" in error["message"] and "data.values: normalized" in error["fix"]
    assert "run not started" in captured.err
    assert not (tmp_path / "run" / "report.json").exists()


# -- identifiers and labels ---------------------------------------------------------------------------------

ENSEMBL = [f"ENSG{i:011d}" for i in range(40)]


def test_ensembl_data_and_panel_without_id_kind_names_the_setting(tmp_path, small_config_dict, capsys):
    rewrite(tmp_path, lambda adata: setattr(adata, "var_names", ENSEMBL))
    small_config_dict["panel"] = {"features": ENSEMBL}  # id_kind left at its default, symbol
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    (error,) = [f for f in errors(report) if f["field"] == "var_names"]
    assert "features are ensembl IDs but the consortium panel uses symbol IDs" in error["message"]
    assert error["fix"] == "set `panel.id_kind: ensembl` in consortium.yaml: the panel lists Ensembl IDs too"
    small_config_dict["panel"]["id_kind"] = "ensembl"
    assert check_json(capsys, write_config(tmp_path, small_config_dict))[0] == 0


def test_ensembl_data_with_symbols_against_a_symbol_panel_names_var_id_column(tmp_path, small_config_dict, capsys):
    def ensembl_with_symbols(adata):
        adata.var["gene_symbols"] = list(adata.var_names)
        adata.var_names = ENSEMBL

    rewrite(tmp_path, ensembl_with_symbols)
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    (error,) = [f for f in errors(report) if "features are ensembl IDs" in f["message"]]
    assert "set `var_id_column: gene_symbols` for this member" in error["fix"]
    small_config_dict["members"][0]["var_id_column"] = "gene_symbols"
    assert check_json(capsys, write_config(tmp_path, small_config_dict))[0] == 0


@pytest.mark.parametrize(
    ("labels", "fix"),
    [
        (("responder", "non-responder"), "add `positive: 'responder'` to task 'resp' in consortium.yaml if"),
        (("PD", "CR"), "add `positive: 'CR'`"),
        (("arm_b", "arm_a"), "add `positive:` to task 'resp' in consortium.yaml, naming the label that means 1 (one "
         "of ['arm_a', 'arm_b']"),
    ],
)  # fmt: skip
def test_text_labels_suggest_the_positive_class_by_meaning_or_ask(tmp_path, small_config_dict, capsys, labels, fix):
    rewrite(tmp_path, lambda a: a.obs.__setitem__("response", np.where(a.obs["response"] == 1, *labels)))
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    (error,) = [f for f in errors(report) if f["field"] == "obs.response"]
    assert fix in error["fix"], error["fix"]


# -- data split and the folds hint --------------------------------------------------------------------------


def test_data_split_prints_lines_not_a_dict_and_json_stays_json(tmp_path, small_config_dict, capsys):
    config = write_config(tmp_path, small_config_dict)
    assert main(["data", "split", "--config", str(config), "--member", "m1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any("{" in line for line in lines), lines
    counts = read_member(tmp_path / "m.h5ad").obs["split"].astype(str).value_counts()  # as the commands read it
    assert lines[0].endswith(f": {counts['train']} train, {counts['val']} val, {counts['test']} test samples")
    assert lines[1].startswith("test split: resp ") and " events" in lines[1] and " labelled" in lines[1]
    assert "hint: the test split of member 'm1' holds about" in " ".join(lines[2:]) and "--folds 5" in lines[-1]
    assert main(["data", "split", "--config", str(config), "--member", "m1", "--force", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stored"] and sum(result["split"].values()) == 80


def test_data_check_hints_at_folds_for_a_small_member_only(tmp_path, small_config_dict, capsys):
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 0
    (hint,) = report["hints"]  # 80 samples: about 6 test samples of the scarcer class, events and labels
    assert hint.startswith("hint: the test split of member 'm1' holds about ") and "'--folds 5'" in hint
    small_config_dict["data"]["folds"] = 5
    assert check_json(capsys, write_config(tmp_path, small_config_dict))[1]["hints"] == []


def test_the_demo_sized_members_get_no_folds_hint(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--sizes", "300,300", "--features", "120"]) == 0
    capsys.readouterr()
    for member in ("pharma-a", "pharma-b"):  # 300 samples, the demo's smallest member
        code, report = check_json(capsys, tmp_path / "c" / "consortium.yaml", member)
        assert code == 0 and report["hints"] == [], report["hints"]


# -- the job script, the demo's ports -----------------------------------------------------------------------


def test_job_script_config_error_is_one_line_not_a_traceback(tmp_path, small_config_dict):
    small_config_dict["training"] = {"rounds": 0}
    config = write_config(tmp_path, small_config_dict)
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "job.py"), "--config", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "training.rounds = 0" in done.stderr
    assert done.stderr.startswith("error: ")


def test_job_script_submit_hint_names_the_lead_kit(tiny_consortium, tmp_path, capsys):
    job.main(["--config", str(tiny_consortium), "--export-to", str(tmp_path / "exported")])
    folder = tmp_path / "exported" / "synthetic-consortium-biomarker-mtl"
    lead = load_config(tiny_consortium).members[0].admin
    assert f"nvflare job submit -j {folder} --startup-kit KITS/{lead}" in capsys.readouterr().out


def test_demo_ports_are_written_into_the_demo_config(tmp_path, small_config_dict):
    config = write_config(tmp_path, small_config_dict)
    set_operator_ports(config, "9102,9103")
    loaded = load_config(config)
    assert (loaded.operator.fl_port, loaded.operator.admin_port) == (9102, 9103)
    with pytest.raises(ConfigError, match="fl_port and admin_port are both 9102"):
        set_operator_ports(config, "9102,9102")
    with pytest.raises(UserError, match="--ports 'x': give the FL and admin ports as two numbers"):
        set_operator_ports(config, "x")
    set_operator_ports(config, None)
    assert load_config(config).operator.fl_port == 9102


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_passes_its_ports_to_the_demo():
    done = subprocess.run(["make", "-n", "demo", "DEMO_PORTS=9102,9103"], cwd=REPO, capture_output=True, text=True)
    assert "consortium demo --out runs/demo --force --ports 9102,9103" in done.stdout, done.stdout + done.stderr
