"""The ``consortium`` command line.

Each command group lives in ``consortium/commands/<group>.py`` and registers itself on the app.
User errors (:class:`schema.errors.UserError`) are printed without a traceback and mapped to
their exit code; 0 means success, 1 a failed check, 2 a usage or input error.

Starting the CLI loads no heavy library (torch, NVFlare, MLflow, TenSEAL, scanpy, scikit-learn): the
command modules import them inside the command that needs them, so ``--help``, ``--version``, ``init``,
``synth`` and ``data check`` start in about a second (``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading

import typer
from rich.text import Text

from consortium.commands import audit, data, feasibility, init, provisioning, release, report, run, score, stats, synth
from consortium.console import INTERRUPTED_MESSAGE, Console
from schema.errors import UserError

DISTRIBUTION = "biomarker-consortium"

app = typer.Typer(
    name="consortium",
    help="Federated biomarker discovery for a pharma consortium, on NVIDIA FLARE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version  # only here: it costs ~0.1 s at start

    try:
        typer.echo(f"consortium {version(DISTRIBUTION)}")
    except PackageNotFoundError:  # a source tree used without installing it
        typer.echo("consortium (not installed: run 'pip install -e .')")
    raise typer.Exit(0)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library log messages."),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


for _module in (init, data, synth, run, stats, feasibility, release, report, provisioning, audit, score):
    _module.register(app)


def command_line() -> typer.core.TyperGroup:
    """The app as the command it runs, its boolean flags shown as flags.

    Typer's help (0.29.2) gives every flag a ``<bool>`` type, which reads as if it took a value: a user
    then types ``--verbose true`` and is told ``true`` is an unexpected argument. A flag's metavar left
    empty shows it bare, as click's own help does."""
    root = typer.main.get_command(app)
    _show_flags_bare(root)
    return root


def _show_flags_bare(command) -> None:
    help_option = command.get_help_option(typer.Context(command))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _show_flags_bare(sub)


def _flag_given_a_value(args: list[str]) -> None:
    """After a usage error: say so when a flag was given a value (``--verbose true``)."""
    flags: set[str] = set()
    stack = [command_line()]
    while stack:
        command = stack.pop()
        flags |= {name for p in command.params if getattr(p, "is_flag", False) for name in p.opts + p.secondary_opts}
        stack += list(getattr(command, "commands", {}).values())
    for flag, value in zip(args, args[1:], strict=False):
        if flag in flags and value.lower() in _BOOLEAN_WORDS:
            _print_error(f"{flag} is a flag and takes no value: give '{flag}' alone, without '{value}'")
            return


_BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    # no usage telemetry from MLflow (this platform runs in closed networks); FLARE's processes inherit it
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # SIGTERM and Ctrl-C unwind the same way: every finally runs, FLARE's processes are stopped
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # click returns the code of a typer.Exit instead of raising it when standalone_mode is off
        code = command_line()(args=argv, standalone_mode=False)
        if code == 130:  # click's return for an interrupt (KeyboardInterrupt) outside standalone mode
            _interrupted(console_script=argv is None)
    except UserError as exc:
        _print_error(str(exc))
        return _leave(exc.exit_code, console_script=argv is None)
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
            _flag_given_a_value(sys.argv[1:] if argv is None else argv)
            return exc.exit_code
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # The interpreter's last garbage collections would walk every object the libraries made (torch,
        # MLflow, NVFlare, matplotlib: 2.4 s after a run's last line); frozen, they are left to the exit.
        gc.freeze()
    return code if isinstance(code, int) else 0


def _interrupted(*, console_script: bool) -> None:
    """Say so; from the console script, leave at once. Every ``finally`` has run by now (FLARE's
    processes are stopped), but NVFlare's admin client may keep a non-daemon thread retrying the server
    we just stopped, which would hold the interpreter open."""
    _print_error(INTERRUPTED_MESSAGE)
    if console_script:
        _exit_now(130)


def _leave(code: int, *, console_script: bool) -> int:
    """After an error, from the console script: leave at once if a thread would hold the interpreter open.

    When the FLARE server died mid-run, NVFlare's admin client keeps a non-daemon thread logging in again
    (30 s) or reconnecting (for ever); the message is printed and every ``finally`` has run (FLARE's
    processes are stopped), so waiting for it would only keep the user from the prompt."""
    held = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if console_script and held:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process with ``code`` without waiting for other threads; output and logs flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _terminate(signum, frame) -> None:
    # FLARE's simulator turns the interrupt into its own failure; the flag says what it was. Only a command
    # that runs FLARE has loaded flare_env (importing it here would load NVFlare for every command).
    flare_env = sys.modules.get("consortium.flare_env")
    if flare_env is not None:
        flare_env.INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def _print_error(message: str) -> None:
    # Text, not markup: a message's own square brackets ("coeff_mod_bit_sizes=[60, 40]") must survive
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
