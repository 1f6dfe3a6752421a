import json

import pytest

from consortium.audit import GENESIS_HASH, AuditError, AuditLog, entry_hash, verify_log


@pytest.fixture
def log(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("provisioned", members=["pharma-a", "pharma-b"])
    log.append("keys_created", fingerprint="ab" * 32)
    log.append("keys_installed", sites=["pharma-a", "pharma-b", "localhost"])
    log.append("job_submitted", job_id="j1", submitter="lead@pharma-a.org")
    log.append("round_completed", job_id="j1", round=0)
    return log


def _lines(log):
    return log.path.read_text().splitlines()


def _write(log, lines):
    log.path.write_text("".join(line + "\n" for line in lines))


def test_entries_are_chained(log):
    entries = log.entries()
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for before, after in zip(entries, entries[1:], strict=False):
        assert after["prev_hash"] == before["hash"]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert entries[1]["details"] == {"fingerprint": "ab" * 32}
    assert entries[0]["timestamp"].endswith("+00:00")


def test_intact_log_verifies(log):
    report = verify_log(log.path)
    assert report.ok
    assert report.entries == 5
    assert report.head_hash == log.entries()[-1]["hash"]
    assert report.events["job_submitted"] == 1
    report.raise_for_failure()


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


def test_edited_and_rehashed_entry_breaks_the_next_link(log):
    lines = _lines(log)
    entry = json.loads(lines[1])
    entry["details"]["fingerprint"] = "cd" * 32
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry)
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 2
    assert "prev_hash" in report.reason


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
    forged = {
        "index": 2,
        "timestamp": entries[2]["timestamp"],
        "event": "model_released",
        "details": {"job_id": "j0"},
        "prev_hash": entries[1]["hash"],
    }
    forged["hash"] = entry_hash(forged)  # a well-formed forgery
    lines.insert(2, json.dumps(forged))
    _write(log, lines)
    report = verify_log(log.path)
    assert report.first_bad == 2
    assert "inserted" in report.reason


def test_cut_tail_is_caught_by_the_head_file(log):
    _write(log, _lines(log)[:-2])
    report = verify_log(log.path)
    assert not report.ok
    assert "tail cut" in report.reason


def test_cut_tail_is_caught_by_an_expected_head(log):
    head = verify_log(log.path).head_hash
    _write(log, _lines(log)[:-1])
    log.head_path.unlink()
    assert verify_log(log.path).ok  # a shorter chain is still a chain ...
    report = verify_log(log.path, expected_head=head)  # ... unless its head was recorded elsewhere
    assert not report.ok
    assert "tail was cut or replaced" in report.reason


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
