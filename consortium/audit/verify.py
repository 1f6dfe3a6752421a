"""Checking an audit log: :func:`verify_log` and its :class:`AuditReport`. Reading only: no byte of the
log, its head or its key files changes, and no key is made.

The reference key every entry must be signed by is, in this order, the public key given (``public_key``,
or ``expected_fingerprint`` which the log's key must match): a copy kept where the log's keeper cannot
write, which proves who wrote the log; else the key beside the log (``<log>.key`` when the writer checks
its own log, ``<log>.pub``, entry 0), which proves the log's integrity (nothing edited, inserted,
reordered or cut since that key signed it) but not its authorship: whoever replaced the log could
have replaced its ``.pub`` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortium.audit.signing import (
    ENTRY_DOMAIN,
    ENTRY_FIELDS,
    GENESIS_HASH,
    AuditError,
    AuditLog,
    entry_hash,
    head_message,
    key_fingerprint,
    load_public_key,
    parse_private_key,
    public_key_hex,
    read_head,
    usage_error,
)


@dataclass
class AuditReport:
    """The outcome of :func:`verify_log`."""

    path: Path
    entries: int = 0
    head_hash: str = GENESIS_HASH
    first_bad: int | None = None
    reason: str = ""
    events: dict[str, int] = field(default_factory=dict)
    key_fingerprint: str | None = None
    key_source: str = ""
    """Where the reference public key came from; only a key recorded elsewhere proves the writer."""
    independent_key: bool = False
    """The reference key was given (``public_key``, ``expected_fingerprint``), not read beside the log."""

    @property
    def proves(self) -> str:
        """What a pass shows: authorship too only when the key was checked against a copy kept elsewhere."""
        return "integrity and authorship" if self.independent_key else "integrity, not authorship"

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.reason

    def raise_for_failure(self) -> None:
        if not self.ok:
            where = f" at entry {self.first_bad}" if self.first_bad is not None else ""
            raise AuditError(f"{self.path}: audit log verification failed{where}: {self.reason}")


def verify_log(
    path: str | Path,
    *,
    expected_head: str | None = None,
    public_key: Ed25519PublicKey | None = None,
    expected_fingerprint: str | None = None,
) -> AuditReport:
    """Check the hash chain, the signatures and the signed head of the audit log at ``path``.

    Detects an edited entry (its hash no longer matches its content), a rewritten one (its signature
    fails), a deleted, inserted or reordered entry (index or ``prev_hash`` breaks), a torn last line, a
    cut tail or an emptied log (the signed ``<log>.head``, or ``expected_head``, says the chain went
    further), and a log re-signed with another key when ``public_key`` or ``expected_fingerprint`` (a
    copy kept elsewhere) is given. Without them the key comes from ``<log>.key`` (when readable), else
    ``<log>.pub``, else the first entry, and all of those that exist must agree. Reads only.

    Raises
    ------
    AuditError
        The log file does not exist (exit code 2).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such audit log"
        raise usage_error(f"{path}: {what}; pass the audit.jsonl written next to the kits or keys")
    report = AuditReport(path=path)
    log = AuditLog(path)
    lines = path.read_bytes().split(b"\n")
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
        missing = [k for k in ENTRY_FIELDS if not isinstance(entry, dict) or k not in entry]
        if missing:
            return _fail(report, position, f"line {position + 1} lacks field(s) {missing} (unsigned or forged)")
        entries.append(entry)

    reference = _reference_key(report, log, entries, public_key, expected_fingerprint)
    if reference is None:
        return report
    if not entries:
        return _fail(report, None, _empty_reason(log))
    reference_hex = public_key_hex(reference)
    indices = [entry["index"] for entry in entries]
    prev_hash = GENESIS_HASH
    for position, entry in enumerate(entries):
        if entry["index"] != position:
            return _index_failure(report, position, indices)
        if entry["hash"] != entry_hash(entry):
            return _fail(report, position, "its content does not match its hash: the entry was edited")
        if entry["public_key"] != reference_hex:
            return _fail(report, position, f"signed by another key than the log's ({report.key_source}): forged")
        if not _signed(reference, ENTRY_DOMAIN + str(entry["hash"]).encode(), entry["signature"]):
            return _fail(report, position, "its signature does not verify: the entry was rewritten without the key")
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
    _check_head(report, log.head_path, entries, reference, expected_head)
    return report


def _reference_key(
    report: AuditReport,
    log: AuditLog,
    entries: list[dict],
    given: Ed25519PublicKey | None,
    expected_fingerprint: str | None,
) -> Ed25519PublicKey | None:
    """The key every entry must be signed by, and a check that all the log's key files agree with it."""
    candidates: list[tuple[str, Ed25519PublicKey]] = []
    if given is not None:
        candidates.append(("the public key given", given))
    try:
        # the writer verifying its own log can read its key; anyone else checks against .pub or a copy
        writer_key = log.key_path.read_bytes() if log.key_path.exists() else None
    except PermissionError:
        writer_key = None
    if writer_key is not None:
        try:
            candidates.append((log.key_path.name, parse_private_key(writer_key, log.key_path).public_key()))
        except AuditError as exc:
            _fail(report, None, str(exc))
            return None
    if log.public_key_path.exists():
        try:
            candidates.append((log.public_key_path.name, load_public_key(log.public_key_path)))
        except AuditError as exc:
            _fail(report, None, str(exc))
            return None
    if entries:
        try:
            candidates.append(("entry 0", Ed25519PublicKey.from_public_bytes(bytes.fromhex(entries[0]["public_key"]))))
        except (ValueError, TypeError):
            _fail(report, 0, "its public_key is not an Ed25519 key: forged")
            return None
    if not candidates:
        _fail(report, None, _empty_reason(log))
        return None
    report.key_source, reference = candidates[0]
    report.key_fingerprint = key_fingerprint(reference)
    report.independent_key = given is not None or expected_fingerprint is not None
    if expected_fingerprint is not None and expected_fingerprint.strip().lower() != report.key_fingerprint:
        _fail(
            report,
            None,
            f"the log's key ({report.key_source}) has fingerprint {report.key_fingerprint[:16]}..., not the "
            f"expected {expected_fingerprint.strip()[:16]}...: the log was written or re-signed by another key",
        )
        return None
    for source, key in candidates[1:]:
        if public_key_hex(key) != public_key_hex(reference):
            first_bad = 0 if source == "entry 0" else None
            _fail(
                report,
                first_bad,
                f"{source} holds another key than {report.key_source}: the log or its key files were replaced",
            )
            return None
    return reference


def _empty_reason(log: AuditLog) -> str:
    head = read_head(log.head_path)
    if head is not None:
        return f"the log holds no entries but {log.head_path.name} records entry {head.get('index')}: it was emptied"
    left = [p.name for p in (log.key_path, log.public_key_path) if p.exists()]
    if left:
        return f"the log holds no entries but {' and '.join(left)} exist: it was emptied"
    return "the log holds no entries; a written audit log is never empty (emptied, or not an audit log)"


def _signed(key: Ed25519PublicKey, message: bytes, signature: Any) -> bool:
    try:
        key.verify(bytes.fromhex(str(signature)), message)
    except (InvalidSignature, ValueError):
        return False
    return True


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


def _check_head(
    report: AuditReport, head_path: Path, entries: list[dict], key: Ed25519PublicKey, expected_head: str | None
) -> None:
    if expected_head is not None and expected_head != report.head_hash:
        report.reason = (
            f"the last entry's hash {report.head_hash[:12]}... differs from the expected head "
            f"{expected_head[:12]}...: the tail was cut or replaced"
        )
        return
    if not head_path.is_file():
        if expected_head is None:
            report.reason = (
                f"{head_path.name} (the signed head) is missing: cannot tell whether the tail is complete; "
                "pass --expected-head with a head hash recorded elsewhere"
            )
        return
    head = read_head(head_path)
    try:
        head_index, head_hash = int(head["index"]), str(head["hash"])
    except (TypeError, KeyError, ValueError):
        report.reason = f"{head_path.name} is unreadable; cannot tell whether the tail is complete"
        return
    if not _signed(key, head_message(head_index, head_hash), head.get("signature")):
        report.reason = f"{head_path.name}: its signature does not verify: the head was rewritten without the key"
        return
    last_index = report.entries - 1
    if head_index > last_index:
        report.reason = f"{head_path.name} records entry {head_index} but the log ends at {last_index}: tail cut"
    elif head_index < 0 or entries[head_index]["hash"] != head_hash:
        report.first_bad = head_index if 0 <= head_index <= last_index else None
        report.reason = f"the entry {head_path.name} records does not match it: the tail was replaced"
    # head_index < last_index with a matching hash: a crash between writing an entry and its head


def _fail(report: AuditReport, index: int | None, reason: str) -> AuditReport:
    report.first_bad = index
    report.reason = reason
    return report
