"""`consortium synth` and `consortium data check` through the CLI: exit codes and actionable messages."""

import json

import anndata as ad
import numpy as np
import pytest
import yaml

from consortium.cli import main
from omics.io import read_member


def write_config(tmp_path, raw):
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check_json(capsys, config, member="m1"):
    code = main(["data", "check", "--config", str(config), "--member", member, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_synth_then_check_every_member(tiny_consortium, capsys):
    config = yaml.safe_load(tiny_consortium.read_text())
    for member in config["members"]:
        code = main(["data", "check", "--config", str(tiny_consortium), "--member", member["name"]])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "fit to join" in out


def test_clean_member_is_fit(tmp_path, small_config_dict, capsys):
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 0 and report["fit"] and report["coverage"] == 1.0


@pytest.mark.parametrize(
    ("corrupt", "field", "message", "fix"),
    [
        (lambda a: a.X.__setitem__((0, 0), np.nan), "X", "1 NaN and 0 infinite values", "re-quantify"),
        (lambda a: a.X.__setitem__((0, 0), -1.0), "X", "1 negative values", "data.values: normalized"),
        (
            lambda a: setattr(a, "obs_names", ["s0"] * 2 + [f"s{i}" for i in range(2, 80)]),
            "obs_names",
            "duplicate sample IDs",
            "unique ID",
        ),
        (
            lambda a: setattr(a, "var_names", ["GENE1"] + [f"GENE{i}" for i in range(1, 40)]),
            "var_names",
            "duplicate feature IDs",
            "each ID appears once",
        ),
        (
            lambda a: setattr(a, "var_names", ["ENSG00000141510"] + [f"GENE{i}" for i in range(1, 40)]),
            "var_names",
            "mixed identifier kinds",
            "map every feature to symbol IDs",
        ),
        (lambda a: a.obs.__setitem__("response", 3.0), "obs.response", "holds values [3.0]", "encode labels as 0/1"),
        (
            lambda a: a.obs.__setitem__("level", "high"),
            "obs.level",
            "non-numeric values",
            "encode the column as numbers",
        ),
        (lambda a: a.obs.__setitem__("os_days", -1.0), "obs.os_days", "survival times are <= 0", "must be positive"),
        (lambda a: a.obs.__setitem__("os_event", 2.0), "obs.os_event", "event indicator holds [2.0]", "1 (event)"),
        (
            lambda a: a.obs.__setitem__("response", [1.0] * 2 + [0.0] * 78),
            "obs.response",
            "2 positives and 78 negatives; the quorum is 5",
            "add labelled samples",
        ),
        (
            lambda a: a.obs.drop(columns=["os_event"], inplace=True),
            "obs.os_event",
            "task 'os' needs column(s) ['os_event'] in obs",
            "add ['os_event'] to obs",
        ),
    ],
)
def test_bad_member_data_is_reported(tmp_path, small_config_dict, capsys, corrupt, field, message, fix):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    corrupt(adata)
    adata.write_h5ad(tmp_path / "m.h5ad")
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    assert report["path"].endswith("m.h5ad")
    errors = [f for f in report["findings"] if f["level"] == "error"]
    assert any(f["field"] == field and message in f["message"] and fix in f["fix"] for f in errors), errors


def test_low_panel_coverage(tmp_path, small_config_dict, capsys):
    small_config_dict["panel"]["features"] += [f"EXTRA{i}" for i in range(40)]
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    assert any("covers 50.0% of the 80-feature panel" in f["message"] for f in report["findings"])


@pytest.mark.parametrize("content", [b"not an anndata file", b"\x89HDF\r\n\x1a\n" + b"\0" * 64])
def test_unreadable_file_is_a_clear_error(tmp_path, small_config_dict, capsys, content):
    (tmp_path / "m.h5ad").write_bytes(content)
    code = main(["data", "check", "--config", str(write_config(tmp_path, small_config_dict)), "--member", "m1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.out + captured.err
    assert "m.h5ad" in captured.out and "re-export" in captured.out.replace("\n", " ")


def test_truncated_file(tmp_path, small_config_dict, capsys):
    data = (tmp_path / "m.h5ad").read_bytes()
    (tmp_path / "m.h5ad").write_bytes(data[: len(data) // 2])
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1 and report["findings"][0]["field"] == "file"
    assert "truncated" in report["findings"][0]["message"]


def test_usage_errors_exit_2_without_traceback(tmp_path, small_config_dict, capsys):
    config = write_config(tmp_path, small_config_dict)
    assert main(["data", "check", "--config", str(config), "--member", "nobody"]) == 2
    assert "no member 'nobody'; members are: m1" in capsys.readouterr().err
    assert main(["data", "check", "--config", str(tmp_path / "absent.yaml"), "--member", "m1"]) == 2
    assert "absent.yaml: no such file" in capsys.readouterr().err
    small_config_dict["members"][0]["tasks"][0]["type"] = "classification"
    assert main(["data", "check", "--config", str(write_config(tmp_path, small_config_dict)), "--member", "m1"]) == 2
    err = capsys.readouterr().err
    assert "members.0.tasks.0" in err and "binary, regression, survival" in err and "Traceback" not in err
    assert main(["data", "check", "--config", str(config)]) == 2
    assert "--member" in capsys.readouterr().err


def test_config_errors_name_field_value_and_fix(tmp_path, small_config_dict, capsys):
    small_config_dict["members"][0]["name"] = "Pharma One"
    small_config_dict["training"] = {"rounds": 0, "learning_rte": 0.1}
    code = main(["data", "check", "--config", str(write_config(tmp_path, small_config_dict)), "--member", "m1"])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2
    assert "members.0.name = 'Pharma One'" in err and "lower-case letters" in err
    assert "training.rounds = 0" in err
    assert "unknown key 'learning_rte' in training (did you mean 'learning_rate'?)" in err


def test_data_split_stores_a_reproducible_split_beside_the_file(tmp_path, small_config_dict, capsys):
    config = write_config(tmp_path, small_config_dict)
    original = (tmp_path / "m.h5ad").read_bytes()
    assert main(["data", "split", "--config", str(config), "--member", "m1"]) == 0
    assert (tmp_path / "m.h5ad").read_bytes() == original  # the member's file is not rewritten
    # one line whatever the folder's length: output that is not a terminal is never wrapped
    assert f"stored split in {tmp_path / 'm.split.csv'}: " in capsys.readouterr().out.splitlines()[0]
    first = read_member(tmp_path / "m.h5ad").obs["split"].astype(str).tolist()
    assert set(first) == {"train", "val", "test"}
    assert main(["data", "split", "--config", str(config), "--member", "m1"]) == 1  # refuses to overwrite
    assert f"{tmp_path / 'm.split.csv'} already holds a split" in capsys.readouterr().out.splitlines()[0]
    assert main(["data", "split", "--config", str(config), "--member", "m1", "--force"]) == 0
    assert read_member(tmp_path / "m.h5ad").obs["split"].astype(str).tolist() == first
    capsys.readouterr()
    code, report = check_json(capsys, config)
    assert code == 0 and not any(f["field"] == "obs.split" for f in report["findings"])  # the check reads it


def test_data_split_in_place_writes_into_the_file(tmp_path, small_config_dict, capsys):
    config = write_config(tmp_path, small_config_dict)
    assert main(["data", "split", "--config", str(config), "--member", "m1"]) == 0
    assert main(["data", "split", "--config", str(config), "--member", "m1", "--in-place", "--force"]) == 0
    assert not (tmp_path / "m.split.csv").exists()  # it would override the split in the file
    assert set(ad.read_h5ad(tmp_path / "m.h5ad").obs["split"].astype(str)) == {"train", "val", "test"}


def test_stored_split_that_does_not_fit_the_file_is_reported(tmp_path, small_config_dict, capsys):
    (tmp_path / "m.split.csv").write_text("sample,split\ns0,train\n")
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 1
    assert "m.split.csv: 79 samples of the data are not in it" in report["findings"][0]["message"]


def test_check_reports_stripped_ensembl_versions_and_layout(tmp_path, small_config_dict, capsys):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    ensembl = [f"ENSG{i:011d}" for i in range(40)]
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)
    adata.var["gene_symbols"] = list(adata.var_names)
    adata.var_names = [f"{e}.2" for e in ensembl]
    adata.write_h5ad(tmp_path / "m.h5ad")
    small_config_dict["panel"] = {"features": ensembl, "id_kind": "ensembl"}
    small_config_dict["members"][0]["layer"] = "counts"
    config = write_config(tmp_path, small_config_dict)
    code, report = check_json(capsys, config)
    assert code == 0, report
    assert report["coverage"] == 1.0
    assert report["layout"] == {
        "matrix": "layers['counts']",
        "identifiers": "var_names",
        "versions_stripped": 40,
        "symbols": "var['gene_symbols']",
    }
    assert main(["data", "check", "--config", str(config), "--member", "m1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "read layers['counts'], identifiers from var_names (40 Ensembl version suffixes stripped)" in out


def test_text_labels_with_positive_are_fit(tmp_path, small_config_dict, capsys):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    adata.obs["response"] = np.where(adata.obs["response"] == 1, "CR", "PD")
    adata.write_h5ad(tmp_path / "m.h5ad")
    small_config_dict["members"][0]["tasks"][0]["positive"] = "CR"
    code, report = check_json(capsys, write_config(tmp_path, small_config_dict))
    assert code == 0, report
    assert report["tasks"]["resp"]["positive"] == "CR" and report["tasks"]["resp"]["positives"] > 0


def test_synth_into_a_relative_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "rel/consortium", "--sizes", "80,90", "--features", "120"]) == 0
    config = yaml.safe_load((tmp_path / "rel/consortium/consortium.yaml").read_text())
    assert config["panel"]["file"] == "panel.txt" and config["members"][0]["data"] == "pharma-a.h5ad"
    assert main(["data", "check", "--config", "rel/consortium/consortium.yaml", "--member", "pharma-b"]) == 0
