import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    entry_hash,
    key_fingerprint,
    load_public_key,
    public_key_hex,
    verify_log,
)
from consortium.cli import main

pytestmark = pytest.mark.fault


@pytest.fixture
def log(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("provisioned", members=["pharma-a", "pharma-b"])
    log.append("keys_created", fingerprint="ab" * 32)
    log.append("keys_installed", sites=["pharma-a", "pharma-b", "localhost"])
    log.append("job_submitted", job_id="j1", submitter="lead@pharma-a.org")
    log.append("round_completed", job_id="j1", round=0)
    return log


@pytest.fixture
def recorded_pub(log, tmp_path):
    """The log's public key as copied elsewhere (a ticket, another machine) when the log was started."""
    copy = tmp_path / "elsewhere" / "audit.pub"
    copy.parent.mkdir()
    copy.write_bytes(log.public_key_path.read_bytes())
    return copy


def _lines(log):
    return log.path.read_text().splitlines()


def _write(log, lines):
    log.path.write_text("".join(line + "\n" for line in lines))


def _resign(log, key, *, edit=None):
    """What an attacker with their own key does: edit, recompute the whole chain, sign, replace head and .pub."""
    attacker = AuditLog(log.path.with_name("forged.jsonl"), signing_key=key)
    for entry in log.entries():
        details = dict(entry["details"])
        if edit is not None and entry["index"] == edit[0]:
            details.update(edit[1])
        attacker.append(entry["event"], **details)
    for suffix in ("", ".head", ".pub"):
        log.path.with_name(log.path.name + suffix).write_bytes(
            attacker.path.with_name(attacker.path.name + suffix).read_bytes()
        )


def test_entries_are_chained_and_signed(log):
    entries = log.entries()
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for before, after in zip(entries, entries[1:], strict=False):
        assert after["prev_hash"] == before["hash"]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert entries[1]["details"] == {"fingerprint": "ab" * 32}
    assert entries[0]["timestamp"].endswith("+00:00")
    public = load_public_key(log.public_key_path)
    assert {e["public_key"] for e in entries} == {public_key_hex(public)}
    assert all(len(e["signature"]) == 128 for e in entries)
    assert (log.key_path.stat().st_mode & 0o777) == 0o600


def test_entries_carry_the_job_id(log, tmp_path):
    assert [e["job_id"] for e in log.entries()] == [None, None, None, "j1", "j1"]
    assert log.entries()[3]["details"]["job_id"] == "j1"  # existing readers of details keep working
    bound = AuditLog(tmp_path / "run.jsonl", job_id="job-7")
    assert bound.append("round_completed", round=1)["job_id"] == "job-7"
    assert bound.append("model_released", job_id="job-8")["job_id"] == "job-8"


def test_intact_log_verifies(log, recorded_pub):
    report = verify_log(log.path)
    assert report.ok, report.reason
    assert report.entries == 5
    assert report.head_hash == log.entries()[-1]["hash"]
    assert report.events["job_submitted"] == 1
    assert report.key_source == "audit.jsonl.key" and not report.independent_key
    report.raise_for_failure()
    against_copy = verify_log(log.path, public_key=load_public_key(recorded_pub))
    assert against_copy.ok and against_copy.independent_key
    assert verify_log(log.path, expected_fingerprint=report.key_fingerprint).ok


def test_edited_entry_is_named(log):
    lines = _lines(log)
    entry = json.loads(lines[2])
    entry["details"]["sites"] = ["pharma-a"]
    lines[2] = json.dumps(entry)
    _write(log, lines)
    report = verify_log(log.path)
    assert (report.first_bad, "edited" in report.reason) == (2, True)
    with pytest.raises(AuditError, match="at entry 2: .*edited") as info:
        report.raise_for_failure()
    assert info.value.exit_code == 1


def test_recomputed_chain_and_head_without_the_key_fail(log):
    """The attack the plain hash chain let through: edit, rehash every later entry, rewrite .head."""
    entries = log.entries()
    entries[1]["details"]["fingerprint"] = "cd" * 32
    prev = entries[0]["hash"]
    for entry in entries[1:]:
        entry["prev_hash"] = prev
        entry["hash"] = prev = entry_hash(entry)
    _write(log, [json.dumps(e) for e in entries])
    head = json.loads(log.head_path.read_text())
    log.head_path.write_text(json.dumps({**head, "hash": prev}))
    report = verify_log(log.path)
    assert report.first_bad == 1
    assert "signature does not verify" in report.reason


def test_log_resigned_with_another_key_fails_against_the_recorded_key(log, recorded_pub):
    _resign(log, Ed25519PrivateKey.generate(), edit=(1, {"fingerprint": "cd" * 32}))
    # the writer's own key, still next to the log, disagrees with the new .pub
    assert "audit.jsonl.pub holds another key" in verify_log(log.path).reason
    log.key_path.unlink()  # the attacker removes it too: only a copy kept elsewhere still tells
    assert verify_log(log.path).ok
    report = verify_log(log.path, public_key=load_public_key(recorded_pub))
    assert not report.ok and "holds another key than the public key given" in report.reason
    fingerprint = key_fingerprint(load_public_key(recorded_pub))
    report = verify_log(log.path, expected_fingerprint=fingerprint)
    assert not report.ok and "re-signed by another key" in report.reason


def test_deleted_entry_is_named(log):
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 1
    assert "deleted" in report.reason


def test_reordered_entries_are_named(log):
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 1
    assert "reordered" in report.reason


def test_inserted_entry_is_named(log):
    lines = _lines(log)
    entries = log.entries()
    forger = Ed25519PrivateKey.generate()
    forged = {
        "index": 2,
        "timestamp": entries[2]["timestamp"],
        "event": "model_released",
        "job_id": "j0",
        "details": {"job_id": "j0"},
        "prev_hash": entries[1]["hash"],
        "public_key": public_key_hex(forger.public_key()),
    }
    forged["hash"] = entry_hash(forged)
    forged["signature"] = forger.sign(b"consortium-audit-entry-v1:" + forged["hash"].encode()).hex()
    lines.insert(2, json.dumps(forged))
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 2
    assert "signed by another key" in report.reason


def test_unsigned_entry_is_named(log):
    lines = _lines(log)
    entry = json.loads(lines[3])
    del entry["signature"]
    lines[3] = json.dumps(entry)
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 3 and "lacks field(s) ['signature']" in report.reason


def test_cut_tail_is_caught_by_the_signed_head(log):
    _write(log, _lines(log)[:-2])
    report = verify_log(log.path)
    assert not report.ok
    assert "records entry 4 but the log ends at 2: tail cut" in report.reason


def test_forged_head_after_a_cut_is_caught(log):
    _write(log, _lines(log)[:-2])
    head = json.loads(log.head_path.read_text())
    log.head_path.write_text(json.dumps({**head, "index": 2, "hash": log.entries()[-1]["hash"]}))
    report = verify_log(log.path)
    assert "head was rewritten without the key" in report.reason


def test_missing_head_fails_unless_a_head_was_recorded_elsewhere(log):
    head = verify_log(log.path).head_hash
    log.head_path.unlink()
    assert "signed head) is missing" in verify_log(log.path).reason
    assert verify_log(log.path, expected_head=head).ok
    _write(log, _lines(log)[:-1])
    report = verify_log(log.path, expected_head=head)
    assert not report.ok
    assert "tail was cut or replaced" in report.reason


@pytest.mark.parametrize("remove", [[], [".head"], [".head", ".key"], [".head", ".key", ".pub"]])
def test_emptied_log_is_broken(log, remove):
    log.path.write_text("")
    for suffix in remove:
        log.path.with_name(log.path.name + suffix).unlink()
    report = verify_log(log.path)
    assert not report.ok
    assert "holds no entries" in report.reason
    if remove != [".head", ".key", ".pub"]:
        assert "emptied" in report.reason


def test_emptied_log_fails_against_the_recorded_key(log, recorded_pub):
    for suffix in ("", ".head", ".key", ".pub"):
        log.path.with_name(log.path.name + suffix).unlink()
    log.path.write_text("")
    report = verify_log(log.path, public_key=load_public_key(recorded_pub))
    assert not report.ok and "holds no entries" in report.reason


def test_torn_last_line_is_named(log):
    log.path.write_text(log.path.read_text()[:-20])
    report = verify_log(log.path)
    assert report.first_bad == 4
    assert "incomplete" in report.reason


def test_missing_log_is_a_usage_error(tmp_path):
    with pytest.raises(AuditError, match="no such audit log") as info:
        verify_log(tmp_path / "nope.jsonl")
    assert info.value.exit_code == 2


def test_append_continues_the_chain_after_reopening(log):
    again = AuditLog(log.path)
    entry = again.append("model_released", job_id="j1", path=log.path)
    assert entry["index"] == 5
    assert entry["details"]["path"] == str(log.path)
    assert verify_log(log.path).ok


def test_append_refuses_another_key_or_a_lost_key(log):
    with pytest.raises(AuditError, match="signed by another key than the signing key given"):
        AuditLog(log.path, signing_key=Ed25519PrivateKey.generate()).append("model_released")
    log.key_path.unlink()
    with pytest.raises(AuditError, match=r"audit.jsonl.key is missing; restore it"):
        log.append("model_released")
    assert len(log.entries()) == 5


def test_a_given_signing_key_writes_no_key_file(tmp_path):
    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path / "audit.jsonl", signing_key=key)
    log.append("provisioned")
    assert not log.key_path.exists()
    assert verify_log(log.path, public_key=key.public_key()).ok


def test_cli_verify_against_a_recorded_key(log, recorded_pub, capsys):
    assert main(["audit", "verify", str(log.path), "--public-key", str(recorded_pub)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out and key_fingerprint(load_public_key(recorded_pub)) in out
    assert log.entries()[-1]["event"] == "round_completed"  # verifying only reads
    _resign(log, Ed25519PrivateKey.generate())
    log.key_path.unlink()
    assert main(["audit", "verify", str(log.path), "--public-key", str(recorded_pub)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "holds another key than the public key given" in err and "Traceback" not in err


@pytest.mark.parametrize("keep", [0, 3])
def test_append_refuses_to_paper_over_an_emptied_or_cut_log(log, keep):
    _write(log, _lines(log)[:keep])
    with pytest.raises(AuditError, match="records entry 4 but the log ends .*emptied or cut"):
        log.append("model_released")
    assert len(log.entries()) == keep
    assert "records entry 4" in verify_log(log.path).reason
