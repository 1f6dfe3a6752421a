"""The ``consortium`` command line.

Each command group lives in ``consortium/commands/<group>.py`` and registers itself on the app.
User errors (:class:`schema.errors.UserError`) are printed without a traceback and mapped to
their exit code; 0 means success, 1 a failed check, 2 a usage or input error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer
from rich.console import Console
from rich.text import Text

from consortium.commands import audit, data, provisioning, report, run, synth
from consortium.flare_env import INTERRUPTED
from schema.errors import UserError

app = typer.Typer(
    name="consortium",
    help="Federated biomarker discovery for a pharma consortium, on NVIDIA FLARE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
INTERRUPTED_MESSAGE = "interrupted; every FLARE process this command started has been stopped"


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
    # SIGTERM and Ctrl-C unwind the same way: every finally runs, FLARE's processes are stopped
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # click returns the code of a typer.Exit instead of raising it when standalone_mode is off
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # click's return for an interrupt (KeyboardInterrupt) outside standalone mode
            _interrupted(console_script=argv is None)
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
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(console_script=argv is None)
        return 130
    except Exception as exc:
        # click's usage errors (typer vendors its own click, so match by shape, not by class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if isinstance(code, int) else 0


def _interrupted(*, console_script: bool) -> None:
    """Say so; from the console script, leave at once. Every ``finally`` has run by now (FLARE's
    processes are stopped), but NVFlare's admin client may keep a non-daemon thread retrying the server
    we just stopped, which would hold the interpreter open."""
    _print_error(INTERRUPTED_MESSAGE)
    if console_script:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _terminate(signum, frame) -> None:
    INTERRUPTED.set()  # FLARE's simulator turns the interrupt into its own failure; this says what it was
    raise KeyboardInterrupt(f"signal {signum}")


def _print_error(message: str) -> None:
    # Text, not markup: a message's own square brackets ("coeff_mod_bit_sizes=[60, 40]") must survive
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
