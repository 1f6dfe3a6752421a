"""Errors of the data layer; the CLI maps them to exit codes."""

from __future__ import annotations


class OmicsError(ValueError):
    """A member's data cannot be used as given; the message names the file, the field and the fix."""


class DataFileError(OmicsError):
    """The file is missing, truncated or not an AnnData ``.h5ad`` file."""


class ContractError(OmicsError):
    """The data breaks the consortium's data contract."""
