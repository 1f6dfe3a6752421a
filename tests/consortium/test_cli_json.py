"""``--json`` on the commands that print a result: one JSON object on stdout and nothing else (notes and
progress go to stderr); and ``consortium run`` checks every member's data before FLARE starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from consortium.audit import AuditLog
from consortium.cli import main


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _json_out(capsys) -> dict:
    """stdout must be exactly one JSON object."""
    out = capsys.readouterr().out
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def test_synth_json(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["synth", "--out", str(out), "--sizes", "60,70", "--features", "120", "--json"]) == 0
    result = _json_out(capsys)
    assert result["config"] == str(out / "consortium.yaml") and Path(result["config"]).exists()
    assert result["ground_truth"] == str(out / "ground_truth.json")
    assert [(m["name"], m["samples"]) for m in result["members"]] == [("pharma-a", 60), ("pharma-b", 70)]


def test_data_split_json(tmp_path, small_config_dict, capsys):
    config = _write(tmp_path, small_config_dict)
    assert main(["data", "split", "--config", str(config), "--member", "m1", "--json"]) == 0
    result = _json_out(capsys)
    assert result["stored"] is True and result["member"] == "m1" and Path(result["path"]).is_file()
    assert set(result["split"]) == {"train", "val", "test"} and sum(result["split"].values()) == 80
    assert main(["data", "split", "--config", str(config), "--member", "m1", "--json"]) == 1
    refused = _json_out(capsys)
    assert refused["stored"] is False and "--force" in refused["reason"]


@pytest.fixture
def audit_log(tmp_path) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("provisioned", members=["pharma-a"])
    log.append("keys_created", fingerprint="ab" * 32)
    return log


def test_audit_verify_json(audit_log, capsys):
    assert main(["audit", "verify", str(audit_log.path), "--json"]) == 0
    result = _json_out(capsys)
    assert result["ok"] is True and result["entries"] == 2 and "recorded" not in result
    assert result["events"] == {"keys_created": 1, "provisioned": 1}
    assert len(result["head_hash"]) == 64 and result["independent_key"] is False
    assert result["proves"] == "integrity, not authorship"
    assert [e["event"] for e in audit_log.entries()][-1] == "keys_created"  # verifying only reads


def test_audit_verify_json_of_a_broken_log_exits_1(audit_log, capsys):
    lines = audit_log.path.read_text().splitlines()
    lines[0] = lines[0].replace("pharma-a", "pharma-x")
    audit_log.path.write_text("".join(line + "\n" for line in lines))
    assert main(["audit", "verify", str(audit_log.path), "--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["ok"] is False and result["first_bad"] == 0 and result["reason"]
    assert "verification failed at entry 0" in captured.err


HE_SMALL = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 20, 40], "global_scale_bits": 20}


def test_provision_and_key_ceremony_json(tmp_path, capsys):
    raw = {
        "name": "demo",
        "operator": {"org": "neutral_op", "host": "localhost"},
        "panel": {"features": ["TP53", "EGFR"]},
        "members": [
            {
                "name": "pharma-a",
                "org": "pharma_a",
                "data": "a.h5ad",
                "tasks": [{"name": "r", "type": "binary", "column": "r"}],
            },
            {
                "name": "pharma-b",
                "org": "pharma_b",
                "data": "b.h5ad",
                "tasks": [{"name": "r", "type": "binary", "column": "r"}],
            },
        ],
        "privacy": {"he": HE_SMALL},
    }
    config = str(_write(tmp_path, raw))
    kits, keys = tmp_path / "kits", tmp_path / "keys"
    assert main(["provision", "--config", config, "--out", str(kits), "--json"]) == 0
    captured = capsys.readouterr()
    provisioned = json.loads(captured.out)
    assert set(provisioned["members"]) == {"pharma-a", "pharma-b"} and Path(provisioned["server"]).is_dir()
    assert provisioned["scope"] and "new audit log" in " ".join(captured.err.split())  # the note, on stderr
    assert main(["keys", "create", "--config", config, "--out", str(keys), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert len(created["fingerprint"]) == 64 and Path(created["public_context"]).exists()
    assert created["poly_modulus_degree"] == 4096
    assert main(["keys", "install", "--config", config, "--kits", str(kits), "--keys", str(keys), "--json"]) == 0
    installed = json.loads(capsys.readouterr().out)
    assert len(installed["installed"]) == 3 and installed["verification"]["ok"] is True
    assert main(["keys", "verify", "--config", config, "--kits", str(kits), "--json"]) == 0
    verified = _json_out(capsys)
    assert verified["ok"] is True and verified["fingerprint"] == created["fingerprint"] and verified["scanned"] > 0
    assert verified["findings"] == []


# -- run: the data contract before FLARE --------------------------------------------------------------


def _unfit(small_config_dict: dict) -> dict:
    """m1 as in the fixture (fit); m2's file does not exist (not fit)."""
    m2 = {**small_config_dict["members"][0], "name": "m2", "org": "Org_Two", "data": "absent.h5ad"}
    small_config_dict["members"].append(m2)
    return small_config_dict


def test_run_stops_on_unfit_data_before_flare_starts(tmp_path, small_config_dict, capsys):
    config = _write(tmp_path, _unfit(small_config_dict))
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out)])
    captured = capsys.readouterr()
    err, stdout = " ".join(captured.err.split()), " ".join(captured.out.split())
    assert code == 1, captured
    assert "run not started: the data of 'm2' does not meet the consortium contract" in err
    assert f"consortium data check --config {config} --member m2" in err
    assert "m2" in stdout and "NOT fit to join" in stdout and "absent.h5ad" in stdout  # m2's contract report
    assert "m1 (" not in stdout  # a fit member's report is not repeated
    assert not out.exists() or not any(out.iterdir())  # no FLARE workspace, no console.log, nothing written


def test_run_json_stops_on_unfit_data_with_every_report(tmp_path, small_config_dict, capsys):
    config = _write(tmp_path, _unfit(small_config_dict))
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "sim", "--no-he", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    result = json.loads(captured.out)
    assert result["started"] is False and result["unfit"] == ["m2"]
    assert result["members"]["m1"]["fit"] is True  # every member's report
    findings = result["members"]["m2"]["findings"]
    assert [f["field"] for f in findings] == ["file"] and "absent.h5ad" in findings[0]["message"], findings
    assert "run not started" in captured.err
    assert not out.exists() or not any(out.iterdir())
