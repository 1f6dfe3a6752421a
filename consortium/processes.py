"""The processes a run started, found by the folder their command line names, and how they are ended.

FLARE's job processes start sessions of their own, so neither a process group nor the parent's exit
ends them; every one of them names its workspace on its command line. Standard library only: the
watchdog (:mod:`consortium.reaper`) imports this module and nothing heavier.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def processes_naming(marker: str) -> list[int]:
    """Pids of the processes (other than this one) whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def signal_processes_under(folder: Path, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` once to every process whose command line names ``folder``; returns how many."""
    pids = processes_naming(str(Path(folder).resolve()))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(pids)


def stop_processes_under(folder: Path) -> int:
    """End every process whose command line names ``folder`` (FLARE's job processes start sessions of
    their own, so they outlive their parent otherwise); returns how many were signalled."""
    signalled = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        count = signal_processes_under(folder, sig)
        signalled = max(signalled, count)
        if not count:
            break
        time.sleep(2)
    return signalled
