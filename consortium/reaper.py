"""A watchdog that ends the FLARE processes a command started when the command dies, even by ``kill -9``.

FLARE's simulator and POC start their job processes in sessions of their own, so they outlive a command
that is killed outright (no ``finally`` runs after SIGKILL) and go on writing into its run folder. The
command starts this small process beside them, as its child, with the kernel's parent-death signal
(``PR_SET_PDEATHSIG``): when the command's thread that started it dies, for whatever reason, the kernel
sends the watchdog SIGTERM, and the watchdog ends every process whose command line names the run's FLARE
workspace (SIGTERM, then SIGKILL), as :func:`consortium.processes.stop_processes_under` does. On a normal
exit the command dismisses it first (SIGUSR1: leave without ending anything). Linux only; elsewhere the
command runs without it (and says so in its log).

Run as ``python -m consortium.reaper PARENT_PID`` with the folder in ``CONSORTIUM_REAPER_FOLDER`` (not
on its command line, so that the processes "naming the folder" never include the watchdog itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from consortium.processes import stop_processes_under

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_READY = b"ready\n"
FOLDER_VARIABLE = "CONSORTIUM_REAPER_FOLDER"


def _set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def reaper_for(folder: Path) -> Iterator[subprocess.Popen | None]:
    """Watch over the FLARE processes under ``folder`` while the block runs; see the module docstring.

    Call it from the thread that lives as long as the command (the main thread): the parent-death signal
    follows the thread that started the watchdog.
    """
    if not sys.platform.startswith("linux"):
        log.info("no watchdog for %s: the parent-death signal is Linux only", folder)
        yield None
        return
    folder = Path(folder).resolve()
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "consortium.reaper", str(os.getpid())],
        env={**os.environ, FOLDER_VARIABLE: str(folder)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the command, which stops FLARE itself
    )
    try:
        ready = watchdog.stdout.readline() if watchdog.stdout else b""
        if ready != _READY:
            log.warning("the watchdog for %s did not start (exit %s)", folder, watchdog.poll())
        yield watchdog
    finally:
        with contextlib.suppress(ProcessLookupError):
            watchdog.send_signal(signal.SIGUSR1)  # dismissed: the command ends its processes itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=5)
        if watchdog.poll() is None:
            watchdog.kill()
        if watchdog.stdout:
            watchdog.stdout.close()


def _watch(folder: Path, parent: int) -> int:
    dismissed = False

    def dismiss(_signum, _frame) -> None:
        nonlocal dismissed
        dismissed = True

    def parent_died(_signum, _frame) -> None:
        raise SystemExit(_reap(folder))

    signal.signal(signal.SIGUSR1, dismiss)
    signal.signal(signal.SIGTERM, parent_died)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _set_parent_death_signal(signal.SIGTERM):
        return 2
    if os.getppid() != parent:  # the parent died before the kernel could be told
        return _reap(folder)
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    while not dismissed:
        signal.pause()
    return 0


def _reap(folder: Path) -> int:
    stop_processes_under(folder)
    return 0


if __name__ == "__main__":
    sys.exit(_watch(Path(os.environ[FOLDER_VARIABLE]), int(sys.argv[1])))
