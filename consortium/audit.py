"""An append-only, hash-chained audit log of the consortium's governance events.

One JSON object a line (``audit.jsonl``). Each entry carries ``index`` (0, 1, 2, ...), ``timestamp``
(UTC, ISO 8601), ``event``, ``details``, ``prev_hash`` (the ``hash`` of the entry before it, 64 zeros
for the first) and ``hash``: the sha256 of the canonical JSON of the other five fields. Editing,
deleting, inserting or reordering an entry breaks the chain, and :func:`verify_log` names the first
entry that does not fit.

A tail cut after the last entry leaves a valid shorter chain; to catch that, every append also
rewrites ``<log>.head`` (the last index and hash). Whoever must prove the log complete should also
copy the head hash somewhere the log's keeper cannot write (a ticket, an e-mail) and pass it to
:func:`verify_log` as ``expected_head``.

Usage::

    log = AuditLog(kits / "audit.jsonl")
    log.append(EVENT_JOB_SUBMITTED, job_id=job_id, submitter="lead@pharma-a.org")

Never put key material or data in ``details``: fingerprints, names, counts and paths only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schema.errors import UserError

GENESIS_HASH = "0" * 64

# The events the platform records; other strings are accepted too, so a new kind needs no change here.
EVENT_PROVISIONED = "provisioned"
EVENT_KEYS_CREATED = "keys_created"
EVENT_KEYS_INSTALLED = "keys_installed"
EVENT_KEYS_VERIFIED = "keys_verified"
EVENT_MEMBER_ADDED = "member_added"
EVENT_JOB_SUBMITTED = "job_submitted"
EVENT_ROUND_COMPLETED = "round_completed"
EVENT_MODEL_RELEASED = "model_released"
EVENT_AUDIT_VERIFIED = "audit_verified"

_FIELDS = ("index", "timestamp", "event", "details", "prev_hash", "hash")


class AuditError(UserError):
    """The audit log is missing, unreadable or fails verification."""

    exit_code = 1


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(entry: dict) -> str:
    """The sha256 (hex) over the canonical JSON of an entry's fields other than ``hash``."""
    return hashlib.sha256(_canonical({k: entry[k] for k in _FIELDS if k != "hash"})).hexdigest()


class AuditLog:
    """An append-only audit log at ``path`` (created with its parent folder on first append)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def append(self, event: str, **details: Any) -> dict:
        """Append one event and return the written entry.

        ``details`` must be JSON-serializable (paths and other objects are written with ``str``).
        Appends from several processes are serialized with an exclusive file lock.
        """
        if not event or not isinstance(event, str):
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                last = _last_entry(handle)
                entry = {
                    "index": 0 if last is None else last["index"] + 1,
                    "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "event": event,
                    "details": json.loads(_canonical(details)),
                    "prev_hash": GENESIS_HASH if last is None else last["hash"],
                }
                entry["hash"] = entry_hash(entry)
                handle.seek(0, os.SEEK_END)
                handle.write(_canonical(entry) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                self._write_head(entry)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return entry

    def entries(self) -> list[dict]:
        """All entries, parsed but not verified (use :func:`verify_log` for that)."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _write_head(self, entry: dict) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"index": entry["index"], "hash": entry["hash"]}) + "\n")
        os.replace(tmp, self.head_path)


def _last_entry(handle) -> dict | None:
    handle.seek(0)
    lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        last = json.loads(lines[-1])
        return {"index": int(last["index"]), "hash": str(last["hash"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(
            f"cannot append: the last line of the audit log is not a valid entry ({exc}); "
            "run 'consortium audit verify' on it before writing more"
        ) from None


@dataclass
class AuditReport:
    """The outcome of :func:`verify_log`."""

    path: Path
    entries: int = 0
    head_hash: str = GENESIS_HASH
    first_bad: int | None = None
    reason: str = ""
    events: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.reason

    def raise_for_failure(self) -> None:
        if not self.ok:
            where = f" at entry {self.first_bad}" if self.first_bad is not None else ""
            raise AuditError(f"{self.path}: audit log verification failed{where}: {self.reason}")


def verify_log(path: str | Path, *, expected_head: str | None = None) -> AuditReport:
    """Check the hash chain of the audit log at ``path``.

    Detects an edited entry (its hash no longer matches its content), a deleted, inserted or reordered
    entry (index or ``prev_hash`` breaks), a torn last line, and a cut tail when ``<log>.head`` or
    ``expected_head`` (a head hash recorded elsewhere) says the chain went further.

    Raises
    ------
    AuditError
        The log file does not exist (exit code 2).
    """
    path = Path(path)
    if not path.is_file():
        error = AuditError(f"{path}: no such audit log; pass the audit.jsonl written next to the kits or keys")
        error.exit_code = 2
        raise error
    report = AuditReport(path=path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return _fail(report, len(lines) - 1, "the last line is incomplete (no newline): a torn or cut write")

    entries = []
    for position, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return _fail(report, position, f"line {position + 1} is not valid JSON")
        missing = [k for k in _FIELDS if not isinstance(entry, dict) or k not in entry]
        if missing:
            return _fail(report, position, f"line {position + 1} lacks field(s) {missing}")
        entries.append(entry)

    indices = [entry["index"] for entry in entries]
    prev_hash = GENESIS_HASH
    for position, entry in enumerate(entries):
        if entry["index"] != position:
            return _index_failure(report, position, indices)
        if entry["hash"] != entry_hash(entry):
            return _fail(report, position, "its content does not match its hash: the entry was edited")
        if entry["prev_hash"] != prev_hash:
            return _fail(
                report,
                position,
                "prev_hash does not match the hash of the entry before it: an entry was replaced",
            )
        prev_hash = entry["hash"]
        report.entries += 1
        report.events[entry["event"]] = report.events.get(entry["event"], 0) + 1
    report.head_hash = prev_hash
    _check_head(report, AuditLog(path).head_path, expected_head)
    return report


def _index_failure(report: AuditReport, position: int, indices: list) -> AuditReport:
    found = indices[position]
    if indices.count(found) > 1:
        first = indices.index(found)
        return _fail(report, first, f"index {found} appears at lines {first + 1} and later: an entry was inserted")
    if position in indices[position + 1 :]:
        return _fail(report, position, f"index {found} where {position} was expected: entries were reordered")
    if isinstance(found, int) and found > position:
        return _fail(report, position, f"index {found} where {position} was expected: entries before it were deleted")
    return _fail(report, position, f"index {found} where {position} was expected: an entry was inserted")


def _check_head(report: AuditReport, head_path: Path, expected_head: str | None) -> None:
    if expected_head is not None and expected_head != report.head_hash:
        report.reason = (
            f"the last entry's hash {report.head_hash[:12]}... differs from the expected head "
            f"{expected_head[:12]}...: the tail was cut or replaced"
        )
        return
    if not head_path.is_file():
        return
    try:
        head = json.loads(head_path.read_text())
        head_index, head_hash = int(head["index"]), str(head["hash"])
    except (ValueError, KeyError, TypeError):
        report.reason = f"{head_path.name} is unreadable; cannot tell whether the tail is complete"
        return
    last_index = report.entries - 1
    if head_index > last_index:
        report.reason = f"{head_path.name} records entry {head_index} but the log ends at {last_index}: tail cut"
    elif head_index == last_index and head_hash != report.head_hash:
        report.first_bad = last_index
        report.reason = f"the last entry does not match {head_path.name}: the tail was replaced"


def _fail(report: AuditReport, index: int, reason: str) -> AuditReport:
    report.first_bad = index
    report.reason = reason
    return report
