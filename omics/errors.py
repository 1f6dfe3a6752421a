"""Errors of the data layer; the CLI maps them to exit codes."""

from __future__ import annotations


class OmicsError(ValueError):
    """A member's data cannot be used as given; the message names the file, the field and the fix."""


class DataFileError(OmicsError):
    """The file is missing, truncated or not an AnnData ``.h5ad`` file."""


class ContractError(OmicsError):
    """The data breaks the consortium's data contract."""


class FieldError(ContractError):
    """A setting does not fit the member's file; ``field``, ``problem`` and ``fix`` apart (the data check
    shows them in its table; the message reads ``<file>: <field>: <problem>; fix: <fix>``)."""

    def __init__(self, field: str, problem: str, fix: str, *, path: str = "") -> None:
        super().__init__(f"{path or 'member data'}: {field}: {problem}; fix: {fix}")
        self.field = field
        self.problem = problem
        self.fix = fix
