"""Bad input through the CLI: every case exits 2 (usage or input error) or 1 (data not fit to join), with
a message naming the file or field and the fix, and never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from consortium.cli import main

pytestmark = pytest.mark.fault


def _flat(text: str) -> str:
    """Rich wraps long lines; compare with the whitespace collapsed."""
    return " ".join(text.split())


def _write_config(tmp_path: Path, raw) -> Path:
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _check(config: Path, member: str = "m1") -> list[str]:
    return ["data", "check", "--config", str(config), "--member", member, "--json"]


# -- consortium.yaml: exit 2, the file, the field, the value and the fix ----------------------------


def _second_member(raw: dict, **overrides) -> dict:
    member = {**raw["members"][0], "name": "m2", "org": "Org_Two", **overrides}
    raw["members"].append(member)
    return raw


def _set(path: str, value) -> Callable[[dict], dict]:
    """A mutation setting ``a.b.0.c`` (list indices as numbers) to ``value``."""

    def mutate(raw: dict) -> dict:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value
        return raw

    return mutate


def _drop(path: str) -> Callable[[dict], dict]:
    def mutate(raw: dict) -> dict:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
        return raw

    return mutate


CONFIG_CASES = {
    "missing name": (_drop("name"), ["name: Field required (add this field)"]),
    "missing members": (_drop("members"), ["members", "add this field"]),
    "missing operator org": (_drop("operator.org"), ["operator.org", "add this field"]),
    "no members": (_set("members", []), ["members = []", "at least 1 item"]),
    "bad consortium name": (_set("name", "My Consortium"), ["name = 'My Consortium'", "lower-case letters"]),
    "rounds not a number": (_set("training.rounds", "five"), ["training.rounds = 'five'", "valid integer"]),
    "rounds zero": (_set("training.rounds", 0), ["training.rounds = 0", "greater than or equal to 1"]),
    "learning rate negative": (_set("training.learning_rate", -0.1), ["training.learning_rate = -0.1"]),
    "bad member name": (_set("members.0.name", "Pharma One"), ["members.0.name = 'Pharma One'", "lower-case"]),
    "bad org": (_set("members.0.org", "Pharma A"), ["members.0.org = 'Pharma A'", "letters, digits and '_'"]),
    "bad member e-mail": (_set("members.0.admin", "lead-at-pharma"), ["members.0.admin", "e-mail address"]),
    "bad operator e-mail": (_set("operator.admin", "admin"), ["operator.admin = 'admin'", "e-mail address"]),
    "same ports": (
        _set("operator.admin_port", 8102),
        ["fl_port and admin_port are both 8102", "(for example 8103)"],
    ),
    "port out of range": (_set("operator.fl_port", 80), ["operator.fl_port = 80", "greater than or equal to 1024"]),
    "duplicate members": (
        lambda raw: _second_member(raw, name="m1"),
        ["members[].name must be unique; repeated: ['m1']"],
    ),
    "same org twice": (
        lambda raw: _second_member(raw, org="Org_One"),
        ["members 'm1' and 'm2' share the org 'Org_One'", "give member 'm2' its own org, e.g. 'M2'"],
    ),
    "same org, other case": (
        lambda raw: _second_member(raw, org="org_one"),
        ["members 'm1' and 'm2' share the org 'org_one'"],
    ),
    "member in the operator's org": (
        _set("members.0.org", "op"),
        ["member 'm1' has the operator's org 'op'", "its own org"],
    ),
    "endpoint with two types": (
        lambda raw: _second_member(raw, tasks=[{"name": "resp", "type": "regression", "column": "level"}]),
        ["endpoint 'resp' is binary at member 'm1' but regression at member 'm2'", "rename one of them"],
    ),
    "survival endpoint in two time units": (
        lambda raw: _second_member(
            _set("members.0.tasks.2.time_unit", "days")(raw),
            tasks=[{"name": "os", "type": "survival", "time": "os_days", "event": "os_event", "time_unit": "months"}],
        ),
        ["endpoint 'os' has time_unit days at 'm1', months at 'm2'", "give every member the same time_unit"],
    ),
    "duplicate task in a member": (
        lambda raw: _set("members.0.tasks", raw["members"][0]["tasks"] * 2)(raw),
        ["members[m1].tasks[].name must be unique; repeated: ['lvl', 'os', 'resp']"],
    ),
    "unknown task type": (
        _set("members.0.tasks.0.type", "classification"),
        ["members.0.tasks.0", "binary, regression, survival"],
    ),
    "task without its column": (_drop("members.0.tasks.0.column"), ["members.0.tasks.0.column", "add this field"]),
    "survival task without event": (_drop("members.0.tasks.2.event"), ["members.0.tasks.2.event", "add this field"]),
    "data not .h5ad": (_set("members.0.data", "m.csv"), ["members.0.data", "'m.csv' is not an .h5ad file"]),
    "coeff_mod_bit_sizes too large for the ring": (
        _set("privacy.he", {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40, 60]}),
        ["coeff_mod_bit_sizes=[60, 40, 60] (160 bits) exceed the 109 bits", "poly_modulus_degree=4096"],
    ),
    "coeff prime too small": (
        _set("privacy.he.coeff_mod_bit_sizes", [60, 10]),
        ["coeff_mod_bit_sizes=[60, 10]: each prime needs 17 to 60 bits (e.g. [60, 40])"],
    ),
    "scale above the data primes": (
        _set("privacy.he", {"coeff_mod_bit_sizes": [40, 40], "global_scale_bits": 40}),
        ["the data primes [40] (40 bits) leave no room above the scale 2^40"],
    ),
    "unsupported ring size": (_set("privacy.he.poly_modulus_degree", 1000), ["privacy.he.poly_modulus_degree = 1000"]),
    "folds below 2": (_set("data.folds", 1), ["data.folds = 1", "greater than or equal to 2"]),
    "val fraction too large": (_set("data.val_fraction", 0.6), ["data.val_fraction = 0.6", "less than 0.5"]),
    "unknown top-level key": (
        _set("trainig", {"rounds": 3}),
        ["unknown key 'trainig' at the top level (did you mean 'training'"],
    ),
    "unknown nested key": (
        _set("training.learning_rte", 0.1),
        ["unknown key 'learning_rte' in training (did you mean 'learning_rate'?)"],
    ),
    "task weight for an unknown task": (
        _set("training.task_weights", {"pfs": 2.0}),
        ["training.task_weights names unknown tasks ['pfs']", "known tasks: ['lvl', 'os', 'resp']"],
    ),
    "panel from two sources": (_set("panel.file", "panel.txt"), ["give the panel either 'features'", "not both"]),
}


@pytest.mark.parametrize("mutate, expected", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_exits_2_naming_field_and_fix(tmp_path, small_config_dict, capsys, mutate, expected):
    config = _write_config(tmp_path, mutate(small_config_dict))
    code = main(_check(config))
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert code == 2, captured
    assert str(config) in err
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in captured.out + captured.err


def _config_file_cases():
    def missing(tmp_path):
        return tmp_path / "absent.yaml", [
            "absent.yaml: no such file",
            f"consortium init --out {tmp_path / 'absent.yaml'}",
        ]

    def folder(tmp_path):
        return tmp_path, [f"{tmp_path}: is a folder", "consortium.yaml"]

    def not_utf8(tmp_path):
        path = tmp_path / "consortium.yaml"
        path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
        return path, ["consortium.yaml: not UTF-8 text (byte 0xe9", "save it as UTF-8"]

    def bad_yaml(tmp_path):
        path = tmp_path / "consortium.yaml"
        path.write_text("name: [unclosed\n")
        return path, ["consortium.yaml: not valid YAML", "fix the syntax"]

    def a_list(tmp_path):
        path = tmp_path / "consortium.yaml"
        path.write_text("- name: x\n")
        return path, ["consortium.yaml: expected a mapping with 'name', 'operator', 'panel' and 'members'"]

    def empty(tmp_path):
        path = tmp_path / "consortium.yaml"
        path.write_text("")
        return path, ["consortium.yaml: expected a mapping"]

    def missing_panel_file(tmp_path):
        raw = {**_tiny_raw(), "panel": {"file": "panel.txt"}}
        return _write_config(tmp_path, raw), ["panel.file: cannot read", "panel.txt", "one feature id a line"]

    return [missing, folder, not_utf8, bad_yaml, a_list, empty, missing_panel_file]


@pytest.mark.parametrize("make", _config_file_cases(), ids=lambda f: f.__name__)
def test_unreadable_config_exits_2(tmp_path, capsys, make):
    config, expected = make(tmp_path)
    code = main(_check(config))
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert code == 2, captured
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in captured.out + captured.err


def test_unknown_member_exits_2(tmp_path, small_config_dict, capsys):
    assert main(_check(_write_config(tmp_path, small_config_dict), member="nobody")) == 2
    assert "no member 'nobody'; members are: m1" in _flat(capsys.readouterr().err)


# -- a member's data: exit 1 (not fit to join), each finding names the field and the fix ----------------


def _x_beyond_float32(a: ad.AnnData) -> None:
    a.X = a.X.astype(np.float64)
    a.X[0, 0] = 1e39


DATA_CASES = {
    "NaN in X": (lambda a: a.X.__setitem__((0, 0), np.nan), "X", "1 NaN and 0 infinite values"),
    "inf in X": (lambda a: a.X.__setitem__((1, 1), np.inf), "X", "0 NaN and 1 infinite values"),
    "X beyond float32": (_x_beyond_float32, "X", "1 values beyond the float32 range"),
    "negative counts": (lambda a: a.X.__setitem__((0, 0), -1.0), "X", "1 negative values"),
    "mixed identifiers": (
        lambda a: setattr(a, "var_names", ["ENSG00000141510"] + [f"GENE{i}" for i in range(1, 40)]),
        "var_names",
        "mixed identifier kinds",
    ),
    "duplicate features": (
        lambda a: setattr(a, "var_names", ["GENE1"] + [f"GENE{i}" for i in range(1, 40)]),
        "var_names",
        "duplicate feature IDs",
    ),
    "low panel coverage": (
        lambda a: setattr(a, "var_names", [f"OTHER{i}" for i in range(20)] + [f"GENE{i}" for i in range(20, 40)]),
        "var_names",
        "covers 50.0% of the 40-feature panel",
    ),
    "missing obs column": (
        lambda a: a.obs.drop(columns=["os_event"], inplace=True),
        "obs.os_event",
        "task 'os' needs column(s) ['os_event'] in obs",
    ),
    "non-binary labels": (lambda a: a.obs.__setitem__("response", 3.0), "obs.response", "holds values [3.0]"),
    "text regression target": (lambda a: a.obs.__setitem__("level", "high"), "obs.level", "non-numeric values"),
    "constant regression target": (lambda a: a.obs.__setitem__("level", 1.0), "obs.level", "a constant target"),
    "infinite survival time": (
        lambda a: a.obs.__setitem__("os_days", [np.inf] + list(a.obs["os_days"][1:])),
        "obs.os_days",
        "1 survival times are infinite",
    ),
    "survival time <= 0": (lambda a: a.obs.__setitem__("os_days", 0.0), "obs.os_days", "survival times are <= 0"),
    "event indicator not 0/1": (
        lambda a: a.obs.__setitem__("os_event", 2.0),
        "obs.os_event",
        "event indicator holds [2.0]",
    ),
    "too few events": (
        lambda a: a.obs.__setitem__("os_event", [1.0] * 3 + [0.0] * 77),
        "obs.os_event",
        "task 'os' has 3 events; the quorum is 5",
    ),
    "too few positives": (
        lambda a: a.obs.__setitem__("response", [1.0] * 2 + [0.0] * 78),
        "obs.response",
        "2 positives and 78 negatives; the quorum is 5",
    ),
    "bad split values": (lambda a: a.obs.__setitem__("split", "training"), "obs.split", "holds values ['training']"),
    "split with one training sample": (
        lambda a: a.obs.__setitem__("split", ["train"] + ["val"] * 40 + ["test"] * 39),
        "obs.split",
        "1 'train' sample",
    ),
}


@pytest.mark.parametrize("corrupt, field, message", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_unfit_data_exits_1_naming_field(tmp_path, small_config_dict, capsys, corrupt, field, message):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    corrupt(adata)
    adata.write_h5ad(tmp_path / "m.h5ad")
    code = main(_check(_write_config(tmp_path, small_config_dict)))
    captured = capsys.readouterr()
    assert code == 1, captured
    report = json.loads(captured.out)
    assert report["path"] == str(tmp_path / "m.h5ad")
    errors = [f for f in report["findings"] if f["level"] == "error"]
    assert any(f["field"] == field and message in f["message"] and f["fix"] for f in errors), errors
    assert "Traceback" not in captured.out + captured.err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


FILE_CASES = {
    "missing file": (lambda p: p.unlink(), "no such file"),
    "truncated h5ad": (_truncate, "truncated"),
    "not HDF5": (lambda p: p.write_text("sample,GENE0\n"), "not an HDF5/AnnData file"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "is a folder"),
    "empty matrix": (lambda p: ad.read_h5ad(p)[:0].copy().write_h5ad(p), "the matrix is empty"),
}


@pytest.mark.parametrize("damage, message", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_unreadable_data_file_exits_1(tmp_path, small_config_dict, capsys, damage, message):
    damage(tmp_path / "m.h5ad")
    code = main(_check(_write_config(tmp_path, small_config_dict)))
    captured = capsys.readouterr()
    assert code == 1, captured
    report = json.loads(captured.out)
    assert any(message in f["message"] and "m.h5ad" in report["path"] for f in report["findings"]), report
    assert "Traceback" not in captured.out + captured.err


# -- output folders and other commands: exit 2, nothing written -------------------------------------


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SYNTH = ["synth", "--sizes", "60,60", "--features", "120"]


def test_synth_refuses_a_non_empty_folder_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "consortium"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    assert main([*SYNTH, "--out", str(out)]) == 2
    err = _flat(capsys.readouterr().err)
    assert f"--out {out}: already holds notes.txt" in err and "--force" in err
    assert _listing(tmp_path) == before
    assert main([*SYNTH, "--out", str(out), "--force"]) == 0
    assert (out / "consortium.yaml").is_file() and (out / "notes.txt").read_text() == "mine"


def _out_cases():
    def existing_file(tmp_path):
        (tmp_path / "taken").write_text("x")
        return [*SYNTH, "--out", str(tmp_path / "taken")], ["taken: is a file", "give a folder"]

    def under_a_file(tmp_path):
        (tmp_path / "taken").write_text("x")
        return [*SYNTH, "--out", str(tmp_path / "taken/sub")], ["taken is a file, not a folder"]

    def unwritable_device(tmp_path):
        return [*SYNTH, "--out", "/dev/null/consortium"], ["/dev/null is a file, not a folder"]

    def sizes_not_numbers(tmp_path):
        return ["synth", "--out", str(tmp_path / "o"), "--sizes", "a,b"], ["--sizes 'a,b': give whole numbers"]

    def sizes_too_small(tmp_path):
        return ["synth", "--out", str(tmp_path / "o"), "--sizes", "10"], ["every member needs at least 60 samples"]

    def too_few_features(tmp_path):
        argv = ["synth", "--out", str(tmp_path / "o"), "--sizes", "60,60,60", "--features", "100"]
        return argv, ["n_features=100 is too small", "use at least 144"]

    def keys_out_is_a_file(tmp_path):
        (tmp_path / "taken").write_text("x")
        config = _write_config(tmp_path, _tiny_raw())
        return ["keys", "create", "--config", str(config), "--out", str(tmp_path / "taken")], ["taken: is a file"]

    def provision_into_a_non_empty_folder(tmp_path):
        (tmp_path / "kits").mkdir()
        (tmp_path / "kits" / "x").write_text("x")
        config = _write_config(tmp_path, _tiny_raw())
        argv = ["provision", "--config", str(config), "--out", str(tmp_path / "kits")]
        return argv, ["kits: already exists and is not empty", "Use a new folder"]

    def split_of_a_missing_file(tmp_path):
        config = _write_config(tmp_path, _tiny_raw())
        argv = ["data", "split", "--config", str(config), "--member", "m1"]
        return argv, [f"{tmp_path / 'm.h5ad'}: no such file", "member 'm1'"]

    def audit_verify_missing_log(tmp_path):
        return ["audit", "verify", str(tmp_path / "audit.jsonl")], ["audit.jsonl: no such audit log"]

    def audit_verify_a_folder(tmp_path):
        return ["audit", "verify", str(tmp_path)], [f"{tmp_path}: is a folder"]

    def audit_public_key_not_a_key(tmp_path):
        (tmp_path / "audit.jsonl").write_text("")
        (tmp_path / "k.pub").write_text("hello")
        argv = ["audit", "verify", str(tmp_path / "audit.jsonl"), "--public-key", str(tmp_path / "k.pub")]
        return argv, ["k.pub: not an Ed25519 public key"]

    def keys_verify_missing_workspace(tmp_path):
        config = _write_config(tmp_path, _tiny_raw())
        argv = ["keys", "verify", "--config", str(config), "--kits", str(tmp_path / "kits")]
        return [*argv, "--workspace", str(tmp_path / "ws")], ["--workspace", "ws: no such folder"]

    return [
        existing_file,
        under_a_file,
        unwritable_device,
        sizes_not_numbers,
        sizes_too_small,
        too_few_features,
        keys_out_is_a_file,
        provision_into_a_non_empty_folder,
        split_of_a_missing_file,
        audit_verify_missing_log,
        audit_verify_a_folder,
        audit_public_key_not_a_key,
        keys_verify_missing_workspace,
    ]


def _tiny_raw() -> dict:
    return {
        "name": "tiny",
        "operator": {"org": "op"},
        "panel": {"features": ["GENE0", "GENE1"]},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "m.h5ad",
                "tasks": [{"name": "r", "type": "binary", "column": "c"}],
            },
        ],
    }


@pytest.mark.parametrize("make", _out_cases(), ids=lambda f: f.__name__)
def test_bad_paths_exit_2_without_traceback(tmp_path, capsys, make):
    argv, expected = make(tmp_path)
    before = _listing(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    err = _flat(captured.err)
    assert code == 2, captured
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in captured.out + captured.err
    assert _listing(tmp_path) == before  # a refused command writes nothing


# -- AnnData conventions: a layout or labels that do not fit the file: exit 1, the member, file and fix ------


def _versions_that_collide(a: ad.AnnData, raw: dict) -> None:
    a.var_names = ["ENSG00000000001.1", "ENSG00000000001.2"] + [f"ENSG{i:011d}.1" for i in range(2, 40)]
    raw["panel"] = {"features": [f"ENSG{i:011d}" for i in range(40)], "id_kind": "ensembl"}


def _text_labels(a: ad.AnnData, raw: dict) -> None:
    a.obs["response"] = np.where(a.obs["response"] == 1, "responder", "non-responder")


def _missing_layer(a: ad.AnnData, raw: dict) -> None:
    a.layers["spliced"] = a.X.copy()
    raw["members"][0]["layer"] = "counts"


def _missing_var_column(a: ad.AnnData, raw: dict) -> None:
    a.var["gene_name"] = list(a.var_names)
    raw["members"][0]["var_id_column"] = "gene_ids"


LAYOUT_CASES = {
    "versioned IDs that collide": (
        _versions_that_collide,
        "var_names",
        ["stripping Ensembl version suffixes makes 1 identifiers collide", "'ENSG00000000001'"],
        "keep one version of each gene",
    ),
    "text labels without positive": (
        _text_labels,
        "obs.response",
        ["task 'resp': column 'response' holds text labels ['non-responder', 'responder']"],
        "add `positive: 'responder'` to task 'resp'",
    ),
    "missing layer": (
        _missing_layer,
        "layer",
        ["member 'm1'", "m.h5ad", "no layer 'counts'; the file holds layers [spliced]"],
        "set 'layer' to one of those",
    ),
    "missing var column": (
        _missing_var_column,
        "var.gene_ids",
        ["member 'm1'", "m.h5ad", "var_id_column 'gene_ids' is not a column of var; its columns are [gene_name]"],
        "set var_id_column to one of those",
    ),
}


@pytest.mark.parametrize("corrupt, field, messages, fix", LAYOUT_CASES.values(), ids=LAYOUT_CASES.keys())
def test_layout_or_labels_that_do_not_fit_exit_1(tmp_path, small_config_dict, capsys, corrupt, field, messages, fix):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    corrupt(adata, small_config_dict)
    adata.write_h5ad(tmp_path / "m.h5ad")
    code = main(_check(_write_config(tmp_path, small_config_dict)))
    captured = capsys.readouterr()
    assert code == 1, captured
    errors = [f for f in json.loads(captured.out)["findings"] if f["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["field"] == field, errors
    for text in messages:
        assert text in errors[0]["message"], (text, errors[0])
    assert fix in errors[0]["fix"], errors[0]
    assert "Traceback" not in captured.out + captured.err
