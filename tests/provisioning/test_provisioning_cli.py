import json
import shutil
import subprocess

import pytest

from consortium.audit import verify_log
from consortium.cli import main


@pytest.fixture
def cli_kits(tmp_path, write_config):
    config = write_config()
    kits, keys = tmp_path / "kits", tmp_path / "keys"
    assert main(["provision", "--config", str(config), "--out", str(kits)]) == 0
    assert main(["keys", "create", "--config", str(config), "--out", str(keys)]) == 0
    assert main(["keys", "install", "--config", str(config), "--kits", str(kits), "--keys", str(keys)]) == 0
    return config, kits, keys


def _events(log):
    return [json.loads(line)["event"] for line in log.read_text().splitlines()]


def test_ceremony_through_the_cli_is_audited(cli_kits, capsys):
    config, kits, keys = cli_kits
    assert main(["keys", "verify", "--config", str(config), "--kits", str(kits)]) == 0
    assert "one key pair" in capsys.readouterr().out
    # the operator's log holds what the operator did; the custodian's, what the custodian did
    assert _events(kits / "audit.jsonl") == ["provisioned", "keys_verified"]
    assert _events(keys / "audit.jsonl") == ["keys_created", "keys_installed"]
    created = json.loads((keys / "audit.jsonl").read_text().splitlines()[0])
    assert len(created["details"]["fingerprint"]) == 64
    assert "secret" not in json.dumps(created["details"]).lower()
    assert main(["audit", "verify", str(kits / "audit.jsonl")]) == 0
    assert _events(kits / "audit.jsonl")[-1] == "keys_verified"  # verifying only reads


def test_keys_verify_fails_with_exit_1_naming_the_file(cli_kits, capsys):
    config, kits, keys = cli_kits
    shutil.copyfile(keys / "client_context.tenseal", kits / "localhost/startup/server_context.tenseal")
    assert main(["keys", "verify", "--config", str(config), "--kits", str(kits)]) == 1
    captured = capsys.readouterr()
    assert "server_context.tenseal: holds a secret key" in captured.err.replace("\n", "")
    assert "findings" in captured.out
    last = json.loads((kits / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "keys_verified" and last["details"]["ok"] is False


def test_audit_verify_fails_with_exit_1_naming_the_entry(cli_kits, capsys):
    _, _, keys = cli_kits
    log = keys / "audit.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("".join(line + "\n" for line in [lines[1], lines[0], *lines[2:]]))
    assert main(["audit", "verify", str(log)]) == 1
    assert "at entry 0" in capsys.readouterr().err
    assert len(log.read_text().splitlines()) == len(lines)  # nothing appended to a broken log


def test_add_member_then_install_only_the_new_member(cli_kits, tmp_path, write_config, new_member):
    _, kits, keys = cli_kits
    grown = write_config(extra_members=[new_member])
    assert main(["add-member", "--config", str(grown), "--kits", str(kits), "--member", "pharma-c"]) == 0
    server_before = (kits / "localhost/startup/server_context.tenseal").read_bytes()
    install = ["keys", "install", "--config", str(grown), "--kits", str(kits), "--keys", str(keys)]
    assert main([*install, "--member", "pharma-c"]) == 0
    assert (kits / "localhost/startup/server_context.tenseal").read_bytes() == server_before
    # three members: secure aggregation by default, so every member kit needs its mask key and the list
    assert main(["keys", "verify", "--config", str(grown), "--kits", str(kits)]) == 1
    assert main(["keys", "masks", "--config", str(grown), "--kits", str(kits)]) == 0
    assert main(["keys", "verify", "--config", str(grown), "--kits", str(kits)]) == 0
    assert _events(kits / "audit.jsonl")[-3:] == ["member_added", "keys_verified", "keys_verified"]
    assert _events(keys / "audit.jsonl")[-1] == "keys_installed"
    assert verify_log(kits / "audit.jsonl").ok and verify_log(keys / "audit.jsonl").ok


def test_provision_inside_git_is_a_usage_error(tmp_path, write_config, capsys):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert main(["provision", "--config", str(write_config()), "--out", str(repo / "kits")]) == 2
    assert "must never be committed" in capsys.readouterr().err.replace("\n", "")


def test_unknown_member_is_named(cli_kits, capsys):
    config, kits, _ = cli_kits
    assert main(["add-member", "--config", str(config), "--kits", str(kits), "--member", "pharma-z"]) == 2
    assert "no member 'pharma-z'" in capsys.readouterr().err
