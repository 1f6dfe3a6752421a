"""The consortium's append-only, hash-chained and signed audit logs.

- :mod:`consortium.audit.signing`: the entry format, the writer's key and :class:`AuditLog` (appending);
- :mod:`consortium.audit.verify`: :func:`verify_log` and its :class:`AuditReport` (reading only);
- :mod:`consortium.audit.chain`: links between the logs of different writers, and :func:`verify_chain`.

This module exports the names the rest of the platform imports; the chain's names are imported from
:mod:`consortium.audit.chain`.
"""

from consortium.audit.signing import (
    EVENT_AUDIT_VERIFIED,
    EVENT_JOB_INTERRUPTED,
    EVENT_JOB_SUBMITTED,
    EVENT_KEYS_CREATED,
    EVENT_KEYS_INSTALLED,
    EVENT_KEYS_VERIFIED,
    EVENT_MEMBER_ADDED,
    EVENT_MODEL_RELEASED,
    EVENT_PROVISIONED,
    EVENT_ROUND_COMPLETED,
    EVENT_STATISTICS_RELEASED,
    GENESIS_HASH,
    AuditError,
    AuditLog,
    entry_hash,
    key_fingerprint,
    load_public_key,
    public_key_hex,
)
from consortium.audit.verify import AuditReport, verify_log

__all__ = [
    "EVENT_AUDIT_VERIFIED",
    "EVENT_JOB_INTERRUPTED",
    "EVENT_JOB_SUBMITTED",
    "EVENT_KEYS_CREATED",
    "EVENT_KEYS_INSTALLED",
    "EVENT_KEYS_VERIFIED",
    "EVENT_MEMBER_ADDED",
    "EVENT_MODEL_RELEASED",
    "EVENT_PROVISIONED",
    "EVENT_ROUND_COMPLETED",
    "EVENT_STATISTICS_RELEASED",
    "GENESIS_HASH",
    "AuditError",
    "AuditLog",
    "AuditReport",
    "entry_hash",
    "key_fingerprint",
    "load_public_key",
    "public_key_hex",
    "verify_log",
]
