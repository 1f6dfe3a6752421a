"""Writing the audit log: the entry format, the writer's Ed25519 key, and appending.

One JSON object a line (``audit.jsonl``). Each entry carries ``index`` (0, 1, 2, ...), ``timestamp``
(UTC, ISO 8601), ``event``, ``job_id`` (the FLARE job it belongs to, ``null`` when none), ``details``,
``prev_hash`` (the ``hash`` of the entry before it, 64 zeros for the first), ``public_key`` (the writer's
Ed25519 key, hex), ``hash`` (the sha256 of the canonical JSON of the fields before it) and
``signature`` (Ed25519 over the hash). Editing, deleting, inserting or reordering an entry breaks the
chain; rewriting entries and recomputing the chain needs the writer's private key, or the signatures
fail. :func:`consortium.audit.verify.verify_log` names the first entry that does not fit.

Files of a log:

- the writer's Ed25519 private key: ``key_path`` (the commands keep it in the writer's private folder,
  outside every folder it hands over: ``<kits>.operator/audit.key``, ``<keys>.custodian/audit.key``);
  without ``key_path`` it is ``<log>.key`` beside the log. Made (mode 0600, its folder 0700) on the
  first append; whoever may append needs it, nobody else should be able to read it.
- ``<log>.pub``: the public key (PEM); it travels with the log. Copy it (or its fingerprint) somewhere
  the log's keeper cannot write and check against that copy (``consortium audit verify --public-key``):
  a log re-signed with another key, and its ``.pub`` replaced, then fails.
- ``<log>.head``: the last index and hash, signed; a cut tail or an emptied log no longer matches it.

An entry may carry ``details["follows"]``: links to the heads of the logs this one follows (see
:mod:`consortium.audit.chain`); an :class:`AuditLog` given ``follows`` records them in the first entry it
appends.

Usage::

    log = AuditLog(kits / "audit.jsonl", key_path=operator_folder(kits) / "audit.key")
    log.append(EVENT_MEMBER_ADDED, member="pharma-c")

Never put key material or data in ``details``: fingerprints, names, counts and paths only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schema.errors import UserError
from schema.writes import WriteError, atomic_write, write_error

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
EVENT_AUDIT_VERIFIED = "audit_verified"  # written by older versions of 'audit verify'; it now only reads

FOLLOWS = "follows"  # the details key holding an entry's links to the heads of other logs
HASHED_FIELDS = ("index", "timestamp", "event", "job_id", "details", "prev_hash", "public_key")
ENTRY_FIELDS = (*HASHED_FIELDS, "hash", "signature")
# domain separation: an entry's signature can never be replayed as a head's, or the reverse
ENTRY_DOMAIN = b"consortium-audit-entry-v1:"
HEAD_DOMAIN = b"consortium-audit-head-v1:"


class AuditError(UserError):
    """The audit log is missing, unreadable or fails verification."""

    exit_code = 1


def usage_error(message: str) -> AuditError:
    """A bad path or key file given on the command line: exit code 2, not the 1 of a broken log."""
    error = AuditError(message)
    error.exit_code = 2
    return error


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(entry: dict) -> str:
    """The sha256 (hex) over the canonical JSON of an entry's hashed fields (all but ``hash``, ``signature``)."""
    return hashlib.sha256(_canonical({k: entry[k] for k in HASHED_FIELDS if k in entry})).hexdigest()


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
        raise usage_error(f"{path}: cannot read the public key ({exc.strerror})") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode().strip()))
    except (ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise usage_error(f"{path}: not an Ed25519 public key; pass the <log>.pub copied when the log was started")
    return key


def beside(log: str | Path, suffix: str) -> Path:
    """``<log><suffix>``: the files that sit next to a log (``.pub``, ``.head``, and the legacy ``.key``)."""
    log = Path(log)
    return log.with_name(log.name + suffix)


class AuditLog:
    """An append-only audit log at ``path`` (created with its parent folder on first append).

    Parameters
    ----------
    signing_key
        The writer's Ed25519 key, in memory. A log's entries are all signed by one key.
    key_path
        Where the writer's key is kept when ``signing_key`` is not given: read from there, or made there
        (mode 0600, in a folder made 0700) on the log's first append. Default ``<log>.key``, beside the
        log: only for a folder that never leaves its writer; a command that hands its folder over keeps
        the key in a private folder of its own (see the module docstring).
    follows
        Links to the heads of the logs this one follows (:func:`consortium.audit.chain.link_to`),
        recorded under ``details["follows"]`` of the first entry this object appends.
    job_id
        Recorded in every entry that does not name its own ``job_id``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        key_path: str | Path | None = None,
        follows: Sequence[Mapping] = (),
        job_id: str | None = None,
    ):
        self.path = Path(path)
        self._signing_key = signing_key
        self._key_path = None if key_path is None else Path(key_path)
        self._follows = [dict(link) for link in follows]
        self.job_id = job_id

    @property
    def head_path(self) -> Path:
        return beside(self.path, ".head")

    @property
    def key_path(self) -> Path:
        return self._key_path if self._key_path is not None else beside(self.path, ".key")

    @property
    def public_key_path(self) -> Path:
        return beside(self.path, ".pub")

    def append(self, event: str, **details: Any) -> dict:
        """Append one signed event and return the written entry.

        ``details`` must be JSON-serializable (paths and other objects are written with ``str``); a
        ``job_id`` among them is also the entry's ``job_id``. Appends from several processes are
        serialized with an exclusive file lock.
        """
        if not event or not isinstance(event, str):
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        if self._follows:
            details = {**details, FOLLOWS: [self._located(link) for link in self._follows]}
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    entry = self._append_locked(handle, event, details)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except (AuditError, WriteError):
            if not existed and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()  # a refused first append leaves no empty log behind
            raise
        self._follows = []  # recorded once, in the first entry this object wrote
        return entry

    def entries(self) -> list[dict]:
        """All entries, parsed but not verified (use :func:`~consortium.audit.verify.verify_log` for that)."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _located(self, link: dict) -> dict:
        """A link with the followed log's place relative to this log's folder: copies kept side by side
        elsewhere (an auditor's) still resolve."""
        relative = os.path.relpath(Path(link["log"]).resolve(), self.path.parent.resolve())
        return {**link, "relative": relative}

    def _append_locked(self, handle, event: str, details: dict) -> dict:
        last = _last_entry(handle, self.path)
        head = read_head(self.head_path)
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
        entry["signature"] = key.sign(ENTRY_DOMAIN + entry["hash"].encode()).hex()
        if not self.public_key_path.exists():  # before the entry: a failed write leaves the log as it was
            _replace(self.public_key_path, _public_pem(key.public_key()))
        _append_line(handle, self.path, _canonical(entry) + b"\n", then=lambda: self._write_head(entry, key))
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
        head["signature"] = key.sign(head_message(entry["index"], entry["hash"])).hex()
        _replace(self.head_path, (json.dumps(head) + "\n").encode())


def head_message(index: int, hash_: str) -> bytes:
    return HEAD_DOMAIN + f"{index}:{hash_}".encode()


def read_head(head_path: Path) -> dict | None:
    """The ``<log>.head`` record, unverified; None when absent or unreadable."""
    try:
        head = json.loads(head_path.read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def _append_line(handle, path: Path, line: bytes, *, then) -> None:
    """Append ``line`` (unbuffered, fsynced) and run ``then`` (the head's update); when either fails,
    the log is cut back to where it ended, so a full disk leaves no torn line and no head ahead of it."""
    fd = handle.fileno()
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        then()
    except (OSError, WriteError) as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
            os.fsync(fd)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def _replace(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise AuditError(f"cannot read {path}: only the log's writer may append to it") from None
    except OSError as exc:
        raise AuditError(f"cannot read {path} ({exc.strerror}); restore it from the writer's backup") from None
    return parse_private_key(data, path)


def parse_private_key(data: bytes, path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM ``data`` read from ``path`` (named in the error)."""
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
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new private folder: nobody else lists it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another writer made it first
        return _read_private_key(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:  # a full disk: no empty key file that would later read as a broken key
        path.unlink(missing_ok=True)
        raise write_error(path, exc) from None
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
