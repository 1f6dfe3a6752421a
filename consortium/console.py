"""The CLI's rich console: messages wrapped to the terminal on a terminal, never wrapped in a file or a pipe.

rich wraps every line it prints at the terminal's width, and at 80 columns when its output is not a
terminal, so a path in a message sent to a log or a pipe came out cut in two for whoever greps it.
:class:`Console` soft-wraps whenever the stream it writes to is not a terminal: a message stays one line.
Tables keep their own width (the terminal's on a terminal, 80 columns elsewhere), their cells wrapped
inside their columns as before.
"""

from __future__ import annotations

from typing import IO, Any

from rich import console as rich_console

INTERRUPTED_MESSAGE = "interrupted; every FLARE process this command started has been stopped"
"""What an interrupted command (SIGINT, SIGTERM) says; a run that kept rounds adds how to continue."""


class Console(rich_console.Console):
    """A ``rich.console.Console`` that does not break a printed line when its output is not a terminal."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **options: Any) -> None:
        if soft_wrap is None and not writes_to_terminal(self.file):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **options)


def writes_to_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal. Not rich's ``Console.is_terminal``: that one also says yes to a
    pipe when ``FORCE_COLOR`` or ``TTY_COMPATIBLE`` asks for colours (CI logs), and a log is still grepped."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False
