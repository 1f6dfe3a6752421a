"""A fast, conventional CLI: what starting a command loads, ``--version``, ``consortium init`` and the
did-you-mean for an unknown key in consortium.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from consortium.cli import main
from schema.config import DataContract, Privacy, Tracking, Training, config_from_dict, load_config
from schema.errors import ConfigError

# What must never load just to start the CLI: each costs seconds (torch, NVFlare, MLflow, scanpy...).
HEAVY = {"torch", "mlflow", "nvflare", "scanpy", "tenseal", "sklearn", "opacus", "captum", "sksurv", "statsmodels"}
# What a command that reads no data must not load either.
DATA_LIBRARIES = {"anndata", "pandas", "numpy", "scipy", "h5py"}

_PROBE = """
import json, sys
from consortium.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
loaded = sorted({name.split(".")[0] for name in sys.modules})
print("\\nLOADED " + json.dumps({"code": code, "loaded": loaded}))
"""


def _loaded_by(*argv: str, cwd: Path) -> tuple[int, set[str]]:
    """Run ``consortium ARGV`` in a fresh interpreter; its exit code and the top-level modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=cwd, check=False, timeout=300
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("LOADED ")), None)
    assert line is not None, done.stdout + done.stderr
    result = json.loads(line.removeprefix("LOADED "))
    return result["code"], set(result["loaded"])


def test_importing_the_cli_loads_no_heavy_library(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import sys, consortium.cli; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert not loaded & (HEAVY | DATA_LIBRARIES), sorted(loaded & (HEAVY | DATA_LIBRARIES))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["data", "--help"], ["run", "--help"]], ids=" ".join)
def test_help_and_version_load_no_heavy_library(tmp_path, argv):
    code, loaded = _loaded_by(*argv, cwd=tmp_path)
    assert code == 0
    assert not loaded & (HEAVY | DATA_LIBRARIES), sorted(loaded & (HEAVY | DATA_LIBRARIES))


def test_init_loads_no_heavy_library(tmp_path):
    code, loaded = _loaded_by("init", "--out", str(tmp_path / "consortium.yaml"), cwd=tmp_path)
    assert code == 0
    assert not loaded & (HEAVY | DATA_LIBRARIES), sorted(loaded & (HEAVY | DATA_LIBRARIES))


def test_synth_and_data_check_load_only_the_data_libraries(tmp_path):
    out = tmp_path / "c"
    code, loaded = _loaded_by("synth", "--out", str(out), "--sizes", "60,60", "--features", "120", cwd=tmp_path)
    assert code == 0
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
    assert "anndata" in loaded  # the probe sees real imports: synth does write AnnData
    config = str(out / "consortium.yaml")
    code, loaded = _loaded_by("data", "check", "--config", config, "--member", "pharma-a", cwd=tmp_path)
    assert code in (0, 1)  # a verdict, not a usage error
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_version_is_the_installed_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"consortium {version('biomarker-consortium')}"


# -- consortium init ---------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [1, 3])
def test_init_writes_a_template_the_schema_accepts(tmp_path, capsys, members):
    path = tmp_path / "consortium.yaml"
    assert main(["init", "--out", str(path), "--members", str(members)]) == 0
    assert str(path) in " ".join(capsys.readouterr().out.split())
    config = load_config(path)
    assert [m.name for m in config.members] == [f"pharma-{c}" for c in "abc"[:members]]
    assert config.members[0].data == tmp_path / "data" / "pharma-a.h5ad"  # relative to the file
    assert config.panel.file == tmp_path / "panel.txt"
    # the sections with defaults are written from the schema: loading gives exactly the defaults
    assert config.data == DataContract()
    assert config.training == Training()
    assert config.privacy == Privacy()
    assert config.tracking == Tracking()


def test_init_template_is_commented_and_shows_optional_settings(tmp_path):
    path = tmp_path / "consortium.yaml"
    assert main(["init", "--out", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("# consortium.yaml")
    assert "  # folds: 5" in text and "  # min_members: 2" in text and "  # uri: " in text
    assert "# - name: overall_survival" in text  # the other task types, as examples
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            key = line.split(":")[0].strip(" -")
            assert "#" in line or key in {"name", "type", "column"}, f"uncommented setting: {line!r}"
    uncommented = yaml.safe_load(text)
    sections = {"name", "operator", "panel", "data", "members", "training", "privacy", "statistics", "tracking"}
    assert set(uncommented) == sections
    assert "  # covariates: {age: numeric, sex: [F, M]}" in text and "  # formula: ~ endpoint + age + sex" in text


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "consortium.yaml"
    path.write_text("name: mine\n")
    assert main(["init", "--out", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--out {path}: already exists" in err and "--force" in err
    assert path.read_text() == "name: mine\n"
    assert main(["init", "--out", str(path), "--force", "--members", "2"]) == 0
    assert len(load_config(path).members) == 2


def test_init_refuses_a_folder(tmp_path, capsys):
    assert main(["init", "--out", str(tmp_path)]) == 2
    assert "is a directory" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


def test_init_json(tmp_path, capsys):
    path = tmp_path / "sub" / "c.yaml"
    assert main(["init", "--out", str(path), "--members", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"config": str(path), "members": 4}
    assert len(load_config(path).members) == 4


# -- did you mean ------------------------------------------------------------------------------------

BASE = {
    "name": "tiny",
    "operator": {"org": "op"},
    "panel": {"features": ["A", "B"]},
    "members": [
        {
            "name": "m1",
            "org": "Org_One",
            "data": "m.h5ad",
            "tasks": [
                {"name": "resp", "type": "binary", "column": "response"},
                {"name": "os", "type": "survival", "time": "t", "event": "e"},
            ],
        }
    ],
}


def _with(path: str, key: str, value) -> dict:
    raw = json.loads(json.dumps(BASE))
    node = raw
    for part in [p for p in path.split(".") if p]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[key] = value
    return raw


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ("training", "ruonds", "unknown key 'ruonds' in training (did you mean 'rounds'?)"),
        ("training", "learning_rte", "unknown key 'learning_rte' in training (did you mean 'learning_rate'?)"),
        ("", "trainig", "unknown key 'trainig' at the top level (did you mean 'training'"),
        ("", "member", "unknown key 'member' at the top level (did you mean 'members'?)"),
        ("operator", "fl_prot", "unknown key 'fl_prot' in operator (did you mean 'fl_port'?)"),
        ("privacy.he", "poly_modulus", "unknown key 'poly_modulus' in privacy.he (did you mean 'poly_modulus_degree'"),
        ("privacy.dp", "epsilom", "unknown key 'epsilom' in privacy.dp (did you mean 'epsilon'?)"),
        ("members.0", "admn", "unknown key 'admn' in members.0 (did you mean 'admin'?)"),
        ("members.0.tasks.0", "colum", "unknown key 'colum' in members.0.tasks.0 (did you mean 'column'?)"),
        ("members.0.tasks.1", "evnt", "unknown key 'evnt' in members.0.tasks.1 (did you mean 'event'?)"),
        ("data", "min_events_", "unknown key 'min_events_' in data (did you mean 'min_events'"),
    ],
)
def test_unknown_key_gets_a_did_you_mean(tmp_path, path, key, expected):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_with(path, key, 1), source=tmp_path / "consortium.yaml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'consortium.yaml'}: 1 invalid field(s)")


def test_unknown_key_far_from_any_lists_the_known_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' in tracking: remove it, or use one of uri, experiment"):
        config_from_dict(_with("tracking", "zzz", 1), source=tmp_path / "c.yaml")


def test_unknown_key_through_the_cli_exits_2(tmp_path, capsys):
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(_with("training", "ruonds", 3)))
    assert main(["data", "check", "--config", str(path), "--member", "m1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: 1 invalid field(s) unknown key 'ruonds' in training (did you mean 'rounds'?)" in err
