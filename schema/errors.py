"""User-facing errors of the consortium platform, each mapped to a CLI exit code.

Library layers raise their own subclasses of :class:`UserError`; the CLI prints the message (which
names the file or field, the value and the fix) and exits with ``exit_code``, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user can fix."""

    exit_code = 2


class ConfigError(UserError):
    """``consortium.yaml`` is missing, malformed or invalid."""
