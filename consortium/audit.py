"""An append-only, hash-chained and signed audit log of the consortium's governance events.

One JSON object a line (``audit.jsonl``). Each entry carries ``index`` (0, 1, 2, ...), ``timestamp``
(UTC, ISO 8601), ``event``, ``job_id`` (the FLARE job it belongs to, ``null`` when none), ``details``,
``prev_hash`` (the ``hash`` of the entry before it, 64 zeros for the first), ``public_key`` (the writer's
Ed25519 key, hex), ``hash`` (the sha256 of the canonical JSON of the fields before it) and
``signature`` (Ed25519 over the hash). Editing, deleting, inserting or reordering an entry breaks the
chain; rewriting entries and recomputing the chain needs the writer's private key, or the signatures
fail. :func:`verify_log` names the first entry that does not fit.

Files next to the log:

- ``<log>.key``: the writer's Ed25519 private key (mode 0600, made on the first append). Whoever may
  append needs it; nobody else should be able to read it.
- ``<log>.pub``: the public key (PEM). Copy it (or its fingerprint) somewhere the log's keeper cannot
  write and check against that copy (``consortium audit verify --public-key``): a log re-signed with
  another key, and its ``.pub`` replaced, then fails.
- ``<log>.head``: the last index and hash, signed; a cut tail or an emptied log no longer matches it.

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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schema.errors import UserError

GENESIS_HASH = "0" * 64

# The events the platform records; other strings are accepted too, so a new kind needs no change here.
EVENT_PROVISIONED = "provisioned"
EVENT_KEYS_CREATED = "keys_created"
EVENT_KEYS_INSTALLED = "keys_installed"
EVENT_KEYS_VERIFIED = "keys_verified"
EVENT_MEMBER_ADDED = "member_added"
EVENT_JOB_SUBMITTED = "job_submitted"
EVENT_JOB_INTERRUPTED = "job_interrupted"
EVENT_ROUND_COMPLETED = "round_completed"
EVENT_MODEL_RELEASED = "model_released"
EVENT_STATISTICS_RELEASED = "statistics_released"
EVENT_AUDIT_VERIFIED = "audit_verified"

_HASHED = ("index", "timestamp", "event", "job_id", "details", "prev_hash", "public_key")
_FIELDS = (*_HASHED, "hash", "signature")
# domain separation: an entry's signature can never be replayed as a head's, or the reverse
_ENTRY_DOMAIN = b"consortium-audit-entry-v1:"
_HEAD_DOMAIN = b"consortium-audit-head-v1:"


class AuditError(UserError):
    """The audit log is missing, unreadable or fails verification."""

    exit_code = 1


def _usage_error(message: str) -> AuditError:
    """A bad path or key file given on the command line: exit code 2, not the 1 of a broken log."""
    error = AuditError(message)
    error.exit_code = 2
    return error


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(entry: dict) -> str:
    """The sha256 (hex) over the canonical JSON of an entry's hashed fields (all but ``hash``, ``signature``)."""
    return hashlib.sha256(_canonical({k: entry[k] for k in _HASHED if k in entry})).hexdigest()


def public_key_hex(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key, hex: what every entry carries."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """The sha256 (hex) of the raw public key: short enough to record in a ticket or an e-mail."""
    return hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``<log>.pub``) or a file holding the 64-hex-digit raw key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _usage_error(f"{path}: cannot read the public key ({exc.strerror})") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode().strip()))
    except (ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise _usage_error(f"{path}: not an Ed25519 public key; pass the <log>.pub copied when the log was started")
    return key


class AuditLog:
    """An append-only audit log at ``path`` (created with its parent folder on first append).

    Parameters
    ----------
    signing_key
        The writer's Ed25519 key. By default it is read from ``<log>.key``, which the first append
        creates (mode 0600); a log's entries are all signed by one key.
    job_id
        Recorded in every entry that does not name its own ``job_id``.
    """

    def __init__(self, path: str | Path, *, signing_key: Ed25519PrivateKey | None = None, job_id: str | None = None):
        self.path = Path(path)
        self._signing_key = signing_key
        self.job_id = job_id

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".key")

    @property
    def public_key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")

    def append(self, event: str, **details: Any) -> dict:
        """Append one signed event and return the written entry.

        ``details`` must be JSON-serializable (paths and other objects are written with ``str``); a
        ``job_id`` among them is also the entry's ``job_id``. Appends from several processes are
        serialized with an exclusive file lock.
        """
        if not event or not isinstance(event, str):
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    entry = self._append_locked(handle, event, details)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except AuditError:
            if not existed and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()  # a refused first append leaves no empty log behind
            raise
        return entry

    def entries(self) -> list[dict]:
        """All entries, parsed but not verified (use :func:`verify_log` for that)."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _append_locked(self, handle, event: str, details: dict) -> dict:
        last = _last_entry(handle, self.path)
        head = _read_head(self.head_path)
        recorded = head.get("index") if head is not None else None
        if isinstance(recorded, int) and recorded > (-1 if last is None else last["index"]):
            # appending would overwrite the head, the one record that the log was emptied or cut
            raise AuditError(
                f"cannot append to {self.path}: {self.head_path.name} records entry {recorded} but the log ends "
                f"{'before its first entry' if last is None else 'at ' + str(last['index'])}: it was emptied or "
                "cut. Keep the files as evidence, run 'consortium audit verify', and start a new log elsewhere"
            )
        key = self._key_for(last)
        public = public_key_hex(key.public_key())
        if last is not None and last["public_key"] != public:
            used = "the signing key given" if self._signing_key is not None else str(self.key_path)
            raise AuditError(
                f"cannot append to {self.path}: its entries are signed by another key than {used}; one log "
                "has one writer key. Restore the original key, or start a new log"
            )
        job_id = details.get("job_id", self.job_id)
        entry = {
            "index": 0 if last is None else last["index"] + 1,
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
            "event": event,
            "job_id": None if job_id is None else str(job_id),
            "details": json.loads(_canonical(details)),
            "prev_hash": GENESIS_HASH if last is None else last["hash"],
            "public_key": public,
        }
        entry["hash"] = entry_hash(entry)
        entry["signature"] = key.sign(_ENTRY_DOMAIN + entry["hash"].encode()).hex()
        handle.seek(0, os.SEEK_END)
        handle.write(_canonical(entry) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._write_head(entry, key)
        if not self.public_key_path.exists():
            _replace(self.public_key_path, _public_pem(key.public_key()))
        return entry

    def _key_for(self, last: dict | None) -> Ed25519PrivateKey:
        if self._signing_key is not None:
            return self._signing_key
        if self.key_path.exists():
            return _read_private_key(self.key_path)
        if last is not None:
            raise AuditError(
                f"cannot append to {self.path}: its signing key {self.key_path} is missing; restore it from "
                "the writer's backup (a new key would not match the signed entries), or start a new log"
            )
        return _create_private_key(self.key_path)

    def _write_head(self, entry: dict, key: Ed25519PrivateKey) -> None:
        head = {"index": entry["index"], "hash": entry["hash"], "public_key": entry["public_key"]}
        head["signature"] = key.sign(_head_message(entry["index"], entry["hash"])).hex()
        _replace(self.head_path, (json.dumps(head) + "\n").encode())


def _head_message(index: int, hash_: str) -> bytes:
    return _HEAD_DOMAIN + f"{index}:{hash_}".encode()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise AuditError(f"cannot read {path}: only the log's writer may append to it") from None
    except OSError as exc:
        raise AuditError(f"cannot read {path} ({exc.strerror}); restore it from the writer's backup") from None
    return _parse_private_key(data, path)


def _parse_private_key(data: bytes, path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: not an Ed25519 private key; restore it from the writer's backup")
    return key


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another writer made it first
        return _read_private_key(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def _last_entry(handle, path: Path) -> dict | None:
    handle.seek(0)
    lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        last = json.loads(lines[-1])
        found = {"index": int(last["index"]), "hash": str(last["hash"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(
            f"cannot append to {path}: its last line is not a valid entry ({exc}); "
            "run 'consortium audit verify' on it before writing more"
        ) from None
    if "public_key" not in last or "signature" not in last:
        raise AuditError(
            f"cannot append to {path}: its entries are not signed (written by an older version); keep it as "
            "evidence, verify it, and start a new log next to it"
        )
    return {**found, "public_key": str(last["public_key"])}


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
    ``<log>.pub``, else the first entry, and all of those that exist must agree.

    Raises
    ------
    AuditError
        The log file does not exist (exit code 2).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such audit log"
        raise _usage_error(f"{path}: {what}; pass the audit.jsonl written next to the kits or keys")
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
        missing = [k for k in _FIELDS if not isinstance(entry, dict) or k not in entry]
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
        if not _signed(reference, _ENTRY_DOMAIN + str(entry["hash"]).encode(), entry["signature"]):
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
            candidates.append((log.key_path.name, _parse_private_key(writer_key, log.key_path).public_key()))
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
    head = _read_head(log.head_path)
    if head is not None:
        return f"the log holds no entries but {log.head_path.name} records entry {head.get('index')}: it was emptied"
    left = [p.name for p in (log.key_path, log.public_key_path) if p.exists()]
    if left:
        return f"the log holds no entries but {' and '.join(left)} exist: it was emptied"
    return "the log holds no entries; a written audit log is never empty (emptied, or not an audit log)"


def _read_head(head_path: Path) -> dict | None:
    try:
        head = json.loads(head_path.read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


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
    head = _read_head(head_path)
    try:
        head_index, head_hash = int(head["index"]), str(head["hash"])
    except (TypeError, KeyError, ValueError):
        report.reason = f"{head_path.name} is unreadable; cannot tell whether the tail is complete"
        return
    if not _signed(key, _head_message(head_index, head_hash), head.get("signature")):
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
