"""Errors of the provisioning layer; the CLI prints them without a traceback."""

from __future__ import annotations

from schema.errors import UserError


class ProvisioningError(UserError):
    """Kits cannot be written or updated (bad output folder, NVFlare provisioning failed, ...)."""


class KeyCeremonyError(UserError):
    """HE keys cannot be created or installed (missing files, wrong folder, existing keys, ...)."""


class KeyVerificationError(UserError):
    """The HE contexts in the kits break the ceremony's guarantees; ``findings`` lists each problem."""

    exit_code = 1

    def __init__(self, message: str, findings: list | None = None):
        super().__init__(message)
        self.findings = findings or []
