"""Audit custody: each party signs its own log with a key no other party receives, ``audit verify`` only
reads, and the logs form one chain an auditor follows from a release back to provisioning.

The kits, the key ceremony and its logs are made once for the module through the CLI, as the operator and
the custodian run it; every test that changes a log changes a copy. The run and release logs are written
as ``consortium run`` and ``consortium release`` write theirs (``AuditLog(<out>/audit.jsonl)``, the key
beside it in the runner's own folder), following the kits and keys folders they were given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.audit import AuditError, AuditLog, key_fingerprint, load_public_key, verify_log
from consortium.audit.chain import link_to, links_to, verify_chain
from consortium.cli import main

pytestmark = pytest.mark.fault

CONFIG = {
    "name": "custody",
    "operator": {"org": "neutral_op", "host": "localhost", "fl_port": 8102, "admin_port": 8103},
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
    "privacy": {"he": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 20, 40], "global_scale_bits": 20}},
}
LOG_FILES = ("audit.jsonl", "audit.jsonl.pub", "audit.jsonl.head")  # what travels: never a private key
PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.S)


def _write_config(folder: Path, *, extra_members: list[dict] = ()) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["members"] += list(extra_members)
    path = folder / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_log(out: Path, *, job_id: str, follows: list[dict], release: bool) -> Path:
    """What ``consortium run`` (or ``release``) appends to ``<out>/audit.jsonl``, following the logs of the
    kits and keys folders it was given."""
    log = AuditLog(out / "audit.jsonl", follows=follows)
    log.append("job_submitted", job_id=job_id, submitter="lead@pharma-a.org", members=["pharma-a", "pharma-b"])
    for round_ in range(2):
        log.append("round_completed", job_id=job_id, round=round_, sites=["pharma-a", "pharma-b"])
    log.append("model_released" if release else "statistics_released", job_id=job_id)
    return log.path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Provisioning, the key ceremony, a run and a release, each writing its own log."""
    root = tmp_path_factory.mktemp("custody")
    config, kits, keys = _write_config(root), root / "KITS", root / "KEYS"
    assert main(["provision", "--config", str(config), "--out", str(kits)]) == 0
    assert main(["keys", "create", "--config", str(config), "--out", str(keys), "--kits", str(kits)]) == 0
    assert main(["keys", "install", "--config", str(config), "--kits", str(kits), "--keys", str(keys)]) == 0
    assert main(["keys", "verify", "--config", str(config), "--kits", str(kits)]) == 0
    lead = kits / "lead@pharma-a.org"
    run = _run_log(root / "run", job_id="job-1", follows=links_to(lead, keys), release=False)
    release = _run_log(
        root / "release", job_id="job-2", follows=links_to(lead, keys / "client_context.tenseal"), release=True
    )
    return {
        "root": root,
        "config": config,
        "KITS": kits / "audit.jsonl",
        "KEYS": keys / "audit.jsonl",
        "run": run,
        "release": release,
        "operator_key": root / "KITS.operator" / "audit.key",
        "custodian_key": root / "KEYS.custodian" / "audit.key",
    }


def _private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def _raw_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _holders_of(key: Ed25519PrivateKey, folder: Path) -> list[Path]:
    """Every file under ``folder`` holding ``key``: as a PEM private key (any name), or its raw bytes."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if raw in data or raw.hex().encode() in data:
            found.append(path)
            continue
        for pem in PEM_PRIVATE.findall(data):
            try:
                other = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError):
                continue
            if isinstance(other, Ed25519PrivateKey) and _raw_public(other.public_key()) == _raw_public(
                key.public_key()
            ):
                found.append(path)
    return found


def _copy_logs(world: dict, dest: Path) -> dict[str, Path]:
    """An auditor's copies: the log files only (log, .pub, .head), in folders placed as the originals."""
    copies = {}
    for name in ("KITS", "KEYS", "run", "release"):
        source = world[name]
        folder = dest / source.parent.relative_to(world["root"])
        folder.mkdir(parents=True)
        for file in LOG_FILES:
            shutil.copy2(source.with_name(file), folder / file)
        copies[name] = folder / "audit.jsonl"
    return copies


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# -- 1. the operator's signing key never lies in a folder another party receives ---------------------


def test_no_file_in_the_kits_or_the_keys_holds_the_operators_signing_key(world):
    operator = _private_key(world["operator_key"])
    kits, keys = world["KITS"].parent, world["KEYS"].parent
    assert _holders_of(operator, world["operator_key"].parent) == [world["operator_key"]]  # the scan finds it
    assert _holders_of(operator, kits) == []
    assert _holders_of(operator, keys) == []
    assert not list(kits.rglob("*.key")) or all(p.parent.name == "startup" for p in kits.rglob("*.key"))  # TLS only
    # the key the operator keeps is the one its log is signed with, private to it
    assert key_fingerprint(operator.public_key()) == verify_log(world["KITS"]).key_fingerprint
    assert (world["operator_key"].stat().st_mode & 0o777) == 0o600
    assert (world["operator_key"].parent.stat().st_mode & 0o777) == 0o700


def test_the_custodian_signs_its_own_log_and_its_folder_holds_no_operator_key(world):
    operator, custodian = _private_key(world["operator_key"]), _private_key(world["custodian_key"])
    keys_log = verify_log(world["KEYS"])
    assert keys_log.ok, keys_log.reason
    assert keys_log.key_fingerprint == key_fingerprint(custodian.public_key()) != key_fingerprint(operator.public_key())
    assert [e["event"] for e in AuditLog(world["KEYS"]).entries()] == ["keys_created", "keys_installed"]
    assert _holders_of(operator, world["KEYS"].parent) == []
    assert _holders_of(custodian, world["KITS"].parent) == []  # the kits the custodian ships do not carry it either
    assert _holders_of(custodian, world["KEYS"].parent) == []


def test_a_signing_key_inside_the_kits_is_refused_before_anything_is_written(tmp_path, capsys):
    config, kits = _write_config(tmp_path), tmp_path / "KITS"
    argv = ["provision", "--config", str(config), "--out", str(kits), "--signing-key", str(kits / "op.key")]
    assert main(argv) == 2
    assert "lies inside the kits folder" in " ".join(capsys.readouterr().err.split())
    assert not kits.exists()


def test_a_key_an_older_version_left_beside_the_kits_log_is_moved_out(world, tmp_path, capsys):
    kits = tmp_path / "KITS"
    shutil.copytree(world["KITS"].parent, kits)
    shutil.copy2(world["operator_key"], kits / "audit.jsonl.key")  # where the old version kept it
    assert _holders_of(_private_key(world["operator_key"]), kits) == [kits / "audit.jsonl.key"]
    grown = _write_config(tmp_path, extra_members=[{**CONFIG["members"][0], "name": "pharma-c", "org": "pharma_c"}])
    assert main(["add-member", "--config", str(grown), "--kits", str(kits), "--member", "pharma-c"]) == 0
    assert "moved the signing key" in " ".join(capsys.readouterr().out.split())
    assert _holders_of(_private_key(world["operator_key"]), kits) == []
    assert (tmp_path / "KITS.operator" / "audit.key").read_bytes() == world["operator_key"].read_bytes()
    report = verify_log(kits / "audit.jsonl", public_key=load_public_key(world["KITS"].with_name("audit.jsonl.pub")))
    assert report.ok and report.events["member_added"] == 1


def test_add_member_without_the_operators_key_changes_nothing(world, tmp_path, capsys):
    kits = Path(shutil.copytree(world["KITS"].parent, tmp_path / "KITS"))  # the custodian's copy: no key beside
    before = _digests(tmp_path)
    grown = _write_config(tmp_path, extra_members=[{**CONFIG["members"][0], "name": "pharma-c", "org": "pharma_c"}])
    assert main(["add-member", "--config", str(grown), "--kits", str(kits), "--member", "pharma-c"]) == 2
    assert "is signed with a key that is not at" in " ".join(capsys.readouterr().err.split())
    assert not (kits / "pharma-c").exists() and not (tmp_path / "KITS.operator").exists()
    assert {k: v for k, v in _digests(tmp_path).items() if k != "consortium.yaml"} == before


def test_keys_verify_by_someone_without_the_operators_key_records_nothing_and_says_so(world, tmp_path, capsys):
    kits = Path(shutil.copytree(world["KITS"].parent, tmp_path / "member-copy"))  # no operator folder beside it
    before = _digests(kits)
    assert main(["keys", "verify", "--config", str(world["config"]), "--kits", str(kits)]) == 0
    assert "not recorded" in " ".join(capsys.readouterr().out.split())
    assert _digests(kits) == before and not (tmp_path / "member-copy.operator").exists()


# -- 2. audit verify only reads ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["KITS", "KEYS", "run", "release"])
def test_verify_against_the_public_key_passes_on_copies_and_changes_no_byte(world, tmp_path, capsys, name):
    copies = _copy_logs(world, tmp_path / "auditor")
    trusted = tmp_path / "trusted.pub"  # the copy of the .pub recorded when the log was started
    shutil.copy2(world[name].with_name("audit.jsonl.pub"), trusted)
    fingerprint = key_fingerprint(load_public_key(trusted))
    before = _digests(tmp_path)
    assert main(["audit", "verify", str(copies[name]), "--public-key", str(trusted)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "intact" in out and f"{fingerprint}, checked against the key given" in out and "not authorship" not in out
    assert main(["audit", "verify", str(copies[name]), "--expected-key-fingerprint", fingerprint, "--json"]) == 0
    result = _json_out(capsys)
    assert result["ok"] and result["proves"] == "integrity and authorship" and "recorded" not in result
    assert _digests(tmp_path) == before  # not one byte, not one new file (no entry appended, no key made)


@pytest.mark.parametrize("name", ["KITS", "KEYS", "run", "release"])
def test_verify_of_the_original_folders_changes_no_byte(world, capsys, name):
    folder = world[name].parent
    before = _digests(folder.parent)
    assert main(["audit", "verify", str(world[name]), "--follow"]) == 0
    assert _digests(folder.parent) == before
    capsys.readouterr()


@pytest.mark.parametrize("name", ["KITS", "KEYS", "run", "release"])
def test_a_copy_edited_by_one_byte_fails_naming_the_entry(world, tmp_path, capsys, name):
    copies = _copy_logs(world, tmp_path / "auditor")
    log, trusted = copies[name], world[name].with_name("audit.jsonl.pub")
    lines = log.read_bytes().split(b"\n")
    edited = len(lines) // 2 - 1 if len(lines) > 2 else 0  # an entry in the middle
    at = lines[edited].index(b'"timestamp":"') + len(b'"timestamp":"') + 3  # a digit of the year
    lines[edited] = lines[edited][:at] + bytes([lines[edited][at] ^ 1]) + lines[edited][at + 1 :]
    log.write_bytes(b"\n".join(lines))
    assert main(["audit", "verify", str(log), "--public-key", str(trusted)]) == 1
    captured = capsys.readouterr()
    assert f"verification failed at entry {edited}: its content does not match its hash" in " ".join(
        captured.err.split()
    )
    assert "Traceback" not in captured.err


def test_without_a_key_verify_names_the_key_it_trusted(world, tmp_path, capsys):
    copies = _copy_logs(world, tmp_path / "auditor")
    assert main(["audit", "verify", str(copies["KITS"])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "trusted the key beside the log (audit.jsonl.pub)" in out
    assert "integrity, not who wrote it" in out
    assert main(["audit", "verify", str(copies["KITS"]), "--json"]) == 0
    result = _json_out(capsys)
    assert (result["key_source"], result["independent_key"], result["proves"]) == (
        "audit.jsonl.pub",
        False,
        "integrity, not authorship",
    )


# -- 3. one chain: provisioning -> key ceremony -> runs -> releases ------------------------------------


def test_the_chain_follows_a_release_back_to_provisioning(world, tmp_path, capsys):
    copies = _copy_logs(world, tmp_path / "auditor")
    trusted = world["release"].with_name("audit.jsonl.pub")
    before = _digests(tmp_path / "auditor")
    assert main(["audit", "verify", str(copies["release"]), "--public-key", str(trusted), "--follow", "--json"]) == 0
    result = _json_out(capsys)
    assert result["ok"] is True
    assert [Path(log["log"]) for log in result["chain"]] == [copies["KITS"], copies["KEYS"], copies["release"]]
    assert [log["checked_against"] for log in result["chain"]][-1] == "the key given"
    assert result["chain"][0]["key_fingerprint"] == verify_log(world["KITS"]).key_fingerprint
    # the release follows the kits and the keys; the keys follow the kits (keys create --kits, keys install)
    assert sorted(
        (Path(link["follower"]).parent.name, Path(link["found"]).parent.name) for link in result["links"]
    ) == [
        ("KEYS", "KITS"),
        ("KEYS", "KITS"),
        ("release", "KEYS"),
        ("release", "KITS"),
    ]
    assert all(link["ok"] for link in result["links"])
    assert _digests(tmp_path / "auditor") == before


def test_links_record_the_followed_heads_in_the_first_entry(world):
    kits_head = verify_log(world["KITS"])
    first = AuditLog(world["run"]).entries()[0]
    links = {Path(link["log"]).parent.name: link for link in first["details"]["follows"]}
    assert set(links) == {"KITS", "KEYS"}
    assert links["KITS"]["relative"] == "../KITS/audit.jsonl"
    assert links["KITS"]["key_fingerprint"] == kits_head.key_fingerprint
    entries = AuditLog(world["KITS"]).entries()
    assert entries[links["KITS"]["index"]]["hash"] == links["KITS"]["hash"]
    assert all("follows" not in e["details"] for e in AuditLog(world["run"]).entries()[1:])


def test_the_operator_rewriting_its_log_after_it_was_followed_breaks_the_chain(world, tmp_path, capsys):
    """The operator holds its key, so its log alone still verifies; the custodian's signed link does not."""
    copies = _copy_logs(world, tmp_path / "auditor")
    rewritten = AuditLog(tmp_path / "rewrite" / "audit.jsonl", signing_key=_private_key(world["operator_key"]))
    for entry in AuditLog(copies["KITS"]).entries():
        details = {**entry["details"], "members": ["pharma-a"]} if entry["event"] == "provisioned" else entry["details"]
        rewritten.append(entry["event"], **details)
    for file in ("audit.jsonl", "audit.jsonl.head"):
        shutil.copy2(rewritten.path.with_name(file), copies["KITS"].with_name(file))
    operator_pub = world["KITS"].with_name("audit.jsonl.pub")
    assert main(["audit", "verify", str(copies["KITS"]), "--public-key", str(operator_pub)]) == 0
    chain = verify_chain(copies["release"], public_key=load_public_key(world["release"].with_name("audit.jsonl.pub")))
    assert not chain.ok
    broken = [link for link in chain.links if not link.ok]
    assert broken and all("rewritten after it was followed" in link.reason for link in broken)
    capsys.readouterr()
    assert main(["audit", "verify", str(copies["release"]), "--follow"]) == 1
    assert "audit chain broken at entry 0" in " ".join(capsys.readouterr().err.split())


def test_a_followed_log_resigned_with_another_key_breaks_the_chain(world, tmp_path):
    copies = _copy_logs(world, tmp_path / "auditor")
    forged = AuditLog(tmp_path / "forged" / "audit.jsonl", signing_key=Ed25519PrivateKey.generate())
    for entry in AuditLog(copies["KEYS"]).entries():
        forged.append(entry["event"], **entry["details"])
    for file in LOG_FILES:
        shutil.copy2(forged.path.with_name(file), copies["KEYS"].with_name(file))
    assert verify_log(copies["KEYS"]).ok  # alone, with its own .pub replaced, it looks intact
    chain = verify_chain(copies["release"])
    assert not chain.ok
    assert any(
        "fails verification" in link.reason and "re-signed by another key" in link.reason for link in chain.links
    )


def test_a_missing_followed_log_is_named(world, tmp_path, capsys):
    copies = _copy_logs(world, tmp_path / "auditor")
    for file in LOG_FILES:
        copies["KEYS"].with_name(file).unlink()
    os.replace(world["KEYS"], tmp_path / "away.jsonl")  # the recorded absolute path is gone too
    try:
        assert main(["audit", "verify", str(copies["release"]), "--follow"]) == 1
    finally:
        os.replace(tmp_path / "away.jsonl", world["KEYS"])
    err = " ".join(capsys.readouterr().err.split())
    assert "the followed log is neither at ../KEYS/audit.jsonl" in err and "copy it" in err


def test_a_broken_log_is_never_followed(world, tmp_path):
    copies = _copy_logs(world, tmp_path / "auditor")
    lines = copies["KITS"].read_text().splitlines()
    copies["KITS"].write_text("".join(line + "\n" for line in lines[:-1]))  # tail cut behind the signed head
    with pytest.raises(AuditError, match="cannot follow .*fails verification.*tail cut"):
        link_to(copies["KITS"])
