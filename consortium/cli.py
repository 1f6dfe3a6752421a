"""The ``consortium`` command line.

Each command group lives in ``consortium/commands/<group>.py`` and registers itself on the app.
User errors (:class:`schema.errors.UserError`) are printed without a traceback and mapped to
their exit code; 0 means success, 1 a failed check, 2 a usage or input error.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.text import Text

from consortium.commands import audit, data, provisioning, report, run, synth
from schema.errors import UserError

app = typer.Typer(
    name="consortium",
    help="Federated biomarker discovery for a pharma consortium, on NVIDIA FLARE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library log messages.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


for _module in (data, synth, run, report, provisioning, audit):
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    # no usage telemetry from MLflow (this platform runs in closed networks); FLARE's processes inherit it
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        # click returns the code of a typer.Exit instead of raising it when standalone_mode is off
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:
            raise
        # a path the user gave that cannot be read or written: no traceback, the path and the reason
        _print_error(f"{exc.filename}: {exc.strerror}; check the path and its permissions, or choose another")
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:
        # click's usage errors (typer vendors its own click, so match by shape, not by class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return code if isinstance(code, int) else 0


def _print_error(message: str) -> None:
    # Text, not markup: a message's own square brackets ("coeff_mod_bit_sizes=[60, 40]") must survive
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
