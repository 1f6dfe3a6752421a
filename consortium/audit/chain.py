"""One chain an auditor can follow: logs that record the heads of the logs they follow.

Each party writes its own log with its own key (the operator ``KITS/audit.jsonl``, the key custodian
``KEYS/audit.jsonl``, whoever runs a job or releases it ``<out>/audit.jsonl``). When a command that is
given another party's folder starts writing, the first entry it appends carries, under
``details["follows"]``, one link per log it follows::

    {"log": "/abs/path/KITS/audit.jsonl",      # where it was
     "relative": "../KITS/audit.jsonl",        # from the following log's folder (copies side by side)
     "index": 3, "hash": "<entry 3's hash>",   # that log's head when it was followed
     "key_fingerprint": "<its writer's key>"}  # sha256 of the followed log's public key

The follower's signature covers the link, so the followed log cannot be rewritten, cut below the
recorded head, or re-signed with another key afterwards without the link failing. :func:`verify_chain`
walks the links from the newest log (a release) back to provisioning: provisioning -> key ceremony ->
runs -> releases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortium.audit.signing import FOLLOWS, AuditError, AuditLog
from consortium.audit.verify import AuditReport, verify_log

AUDIT_FILE = "audit.jsonl"
_LINK_FIELDS = ("log", "index", "hash", "key_fingerprint")


def link_to(log: str | Path) -> dict:
    """A link to the current head of ``log``, which must verify (against the key beside it) first.

    Raises
    ------
    AuditError
        ``log`` fails verification (exit 1): a chain never records the head of a broken log.
    """
    report = verify_log(log)
    if not report.ok:
        where = f" at entry {report.first_bad}" if report.first_bad is not None else ""
        raise AuditError(
            f"cannot follow {log}: it fails verification{where}: {report.reason}. Run 'consortium audit verify "
            f"{log}', keep the files as evidence, and have its writer start a new log"
        )
    return {
        "log": str(Path(log).resolve()),
        "index": report.entries - 1,
        "hash": report.head_hash,
        "key_fingerprint": report.key_fingerprint,
    }


def log_of(folder_or_file: str | Path | None) -> Path | None:
    """The audit log a command's folder argument leads to: ``audit.jsonl`` in it, or in its parent or
    grandparent (a kit inside KITS, ``client_context.tenseal`` inside KEYS or a kit's ``startup/``);
    None when there is none."""
    if folder_or_file is None:
        return None
    path = Path(folder_or_file)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / AUDIT_FILE).is_file():
            return folder / AUDIT_FILE
    return None


def links_to(*folders: str | Path | None) -> list[dict]:
    """Links to the logs that ``folders`` (the kits, keys or kit paths a command was given) lead to,
    each once; folders without a log are skipped (a run in the simulator follows nothing)."""
    logs = {log.resolve(): log for log in map(log_of, folders) if log is not None}
    return [link_to(log) for log in logs.values()]


@dataclass
class LinkCheck:
    """One link, checked: entry ``entry`` of ``follower`` recorded the head of ``recorded``."""

    follower: Path
    entry: int
    recorded: str
    found: Path | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass
class ChainReport:
    """The outcome of :func:`verify_chain`: every log reached, followed logs before their followers."""

    logs: list[AuditReport] = field(default_factory=list)
    trusted: dict[Path, str] = field(default_factory=dict)
    """Per log (resolved path): what its key was checked against."""
    links: list[LinkCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.logs) and all(link.ok for link in self.links)

    def raise_for_failure(self) -> None:
        for report in self.logs:
            report.raise_for_failure()
        for link in self.links:
            if not link.ok:
                raise AuditError(
                    f"{link.follower}: audit chain broken at entry {link.entry} (its link to {link.recorded}): "
                    f"{link.reason}"
                )


def verify_chain(
    log: str | Path,
    *,
    expected_head: str | None = None,
    public_key: Ed25519PublicKey | None = None,
    expected_fingerprint: str | None = None,
) -> ChainReport:
    """Verify ``log`` (as :func:`verify_log` does) and, through its links, every log it follows.

    A followed log is found at its ``relative`` place from the follower's folder, else at its recorded
    ``log`` path. Its key is checked against the fingerprint the link recorded (the follower's signed
    entry vouches for it), and its entry at the link's ``index`` must still have the link's ``hash``.
    """
    chain = ChainReport()
    start = verify_log(
        log, expected_head=expected_head, public_key=public_key, expected_fingerprint=expected_fingerprint
    )
    trusted = "the key given" if start.independent_key else f"{start.key_source or 'the key'} beside the log"
    _walk(start, chain, trusted=trusted, seen={})
    return chain


def _walk(report: AuditReport, chain: ChainReport, *, trusted: str, seen: dict[Path, AuditReport]) -> None:
    seen[report.path.resolve()] = report
    if report.ok:
        for entry in AuditLog(report.path).entries():
            links = entry["details"].get(FOLLOWS) if isinstance(entry.get("details"), dict) else None
            for link in links if isinstance(links, list) else []:
                check, followed = _follow(report.path, entry["index"], link, seen)
                if followed is not None and followed.path.resolve() not in seen:
                    vouched = f"fingerprint recorded in {report.path} entry {entry['index']}"
                    _walk(followed, chain, trusted=vouched, seen=seen)
                if followed is not None and followed.ok and check.ok:
                    _check_head(check, link, followed)
                chain.links.append(check)
    chain.trusted[report.path.resolve()] = trusted
    chain.logs.append(report)  # after the logs it follows: the chain reads from provisioning on


def _follow(follower: Path, index: int, link, seen: dict[Path, AuditReport]) -> tuple[LinkCheck, AuditReport | None]:
    if not isinstance(link, dict) or any(k not in link for k in _LINK_FIELDS):
        return LinkCheck(follower, index, str(link), reason=f"a link lacks one of {list(_LINK_FIELDS)}"), None
    check = LinkCheck(follower, index, str(link["log"]))
    places = [Path(os.path.normpath(follower.parent / str(link["relative"])))] if link.get("relative") else []
    found = next((p for p in [*places, Path(str(link["log"]))] if p.is_file()), None)
    if found is None:
        check.reason = (
            f"the followed log is neither at {link.get('relative')} from {follower.parent} nor at {link['log']}; "
            "copy it (with its .pub and .head) keeping the folders' places relative to each other"
        )
        return check, None
    check.found = found
    report = seen.get(found.resolve())
    if report is None:
        report = verify_log(found, expected_fingerprint=str(link["key_fingerprint"]))
    elif report.key_fingerprint != link["key_fingerprint"]:
        check.reason = f"{found} is signed by key {report.key_fingerprint}, not {link['key_fingerprint']} as recorded"
    if not report.ok and not check.reason:
        check.reason = f"{found} fails verification: {report.reason}"
    return check, report


def _check_head(check: LinkCheck, link: dict, followed: AuditReport) -> None:
    """The followed log still holds, at the recorded index, the entry whose hash was recorded."""
    index = link["index"]
    entries = AuditLog(followed.path).entries()
    if not isinstance(index, int) or index < 0 or index >= len(entries):
        check.reason = (
            f"{followed.path} ends at entry {len(entries) - 1}, but its head was recorded at entry {index}: "
            "the followed log was cut (and re-signed) after it was followed"
        )
    elif entries[index]["hash"] != link["hash"]:
        check.reason = (
            f"{followed.path} entry {index} has another hash than the one recorded: the followed log was "
            "rewritten after it was followed"
        )
