"""A run folder holds one run, taken by one command at a time.

``consortium run`` and ``consortium stats`` check the folder before they start anything (before FLARE,
before an audit entry, before a file is deleted): its audit log must verify (:func:`check_audit_log`), and
an earlier run's files are refused (:func:`refuse_earlier_run`) unless the command continues that run
(``--resume``) or empties the folder first (``--force``: :func:`empty_for_force`). :func:`run_lock` keeps a
second command out while one runs; a lock left by a process that is gone is taken over, in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from consortium.audit import verify_log
from consortium.run_state import KEPT_FOLDER, STATE_FILE, ResumeError, RunState, config_record
from schema.config import ConsortiumConfig
from schema.errors import UserError

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".consortium-run.lock"
# what a run (``consortium run`` or ``consortium stats``) writes first or keeps: one of them marks an earlier run
RUN_MARKERS = (
    STATE_FILE,
    AUDIT_FILE,
    "report.json",
    "statistics.json",
    "feasibility.json",
    KEPT_FOLDER,
    "flare",
    "sites",
)


class RunFolderError(UserError):
    """The run folder cannot take the run as asked (another run holds it, or its audit log is broken)."""


def earlier_run(out: Path) -> list[str]:
    """What an earlier ``consortium run`` or ``stats`` left in ``out`` (the names of :data:`RUN_MARKERS` found)."""
    return [name for name in RUN_MARKERS if (Path(out) / name).exists()]


def refuse_earlier_run(out: Path, *, command: str) -> None:
    """A folder holds one run: refuse ``command`` (``run`` or ``stats``) where an earlier run left its files."""
    found = earlier_run(out)
    if not found:
        return
    what = "an interrupted run"
    for marker, command_name in (("statistics.json", "stats"), ("feasibility.json", "feasibility")):
        if marker in found:
            what = f"the results of 'consortium {command_name}'"
    if "report.json" in found:
        try:
            state = RunState.load(out)
        except ResumeError:
            state = None
        what = "an interrupted run" if state is not None and state.interrupted() else "a finished run"
    ways = "pass --force to empty the folder first (its files are deleted)"
    if command == "run" and STATE_FILE in found:
        ways = f"pass --resume to continue that run (a finished one is released again), or {ways[5:]}"
    raise RunFolderError(
        f"{out} holds {what} ({', '.join(found)}): a folder holds one run, so 'consortium {command}' does not "
        f"write beside it; {ways}, or give another --out. Nothing was written"
    )


def check_force(out: Path, *, inputs: list[Path]) -> None:
    """``--force`` empties ``out``: refused when the consortium's own files (``inputs``) lie inside it."""
    root = Path(out).resolve()
    inside = [p for p in inputs if Path(p).resolve().is_relative_to(root)]
    if inside:
        raise RunFolderError(
            f"--force would empty {out}, which holds the consortium's own {inside[0]}; give the run a folder of "
            "its own (another --out)"
        )


def empty_for_force(out: Path, *, say: Callable[[str], None]) -> None:
    """``--force``: where ``out`` holds an earlier run, delete everything in it (but the lock this command
    holds) and say so in one line; a folder without a run is left as it is."""
    if earlier_run(out):
        say(forced_line(out, empty_folder(out)))


def empty_folder(out: Path) -> list[str]:
    """Delete everything in ``out`` but its lock; the names deleted."""
    removed = []
    for entry in sorted(Path(out).iterdir()):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def forced_line(out: Path, removed: list[str]) -> str:
    """The one line ``--force`` says."""
    shown = ", ".join(removed[:6]) + (f" and {len(removed) - 6} more" if len(removed) > 6 else "")
    return f"--force: emptied {out} before the run ({shown or 'it held nothing'})"


def check_audit_log(out: Path) -> None:
    """Verify the run folder's audit log (if there is one) before a run appends to it or deletes anything:
    a torn last line or a head that does not match is refused at once, naming the file and the fix."""
    path = Path(out) / AUDIT_FILE
    if not path.exists():
        return
    report = verify_log(path)  # the public key next to the log (<log>.pub, <log>.key) must agree
    if report.ok:
        return
    where = f" at entry {report.first_bad}" if report.first_bad is not None else ""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        fix = (
            "keep a copy of it, delete its incomplete last line (an entry being written when a command died), "
            f"check it with 'consortium audit verify {path}' and run the command again"
        )
    else:
        fix = f"keep the folder as evidence ('consortium audit verify {path}' names the entry) and use another --out"
    raise RunFolderError(
        f"{path}: the run folder's audit log does not verify{where}: {report.reason}. Nothing was run, written "
        f"or deleted; to go on, {fix}"
    )


# -- what a command checks before it writes, and again once it holds the lock -----------------------------


def consortium_inputs(config: ConsortiumConfig) -> list[Path]:
    """The consortium's own files, which ``--force`` must never delete."""
    files = [config.source, config.panel.file, *(m.data for m in config.members)]
    return [Path(f) for f in files if f is not None]


def check_run_folder(
    out: Path, arguments: dict, *, config: ConsortiumConfig, resume: bool, force: bool
) -> RunState | None:
    """Everything ``consortium run`` refuses in ``out`` before it writes a file, in order: a live run holding
    it, the audit log, then an earlier run (without ``resume`` or ``force``), or with ``resume`` other
    ``arguments``, another config or a changed data file. The run state to continue with ``resume``."""
    holder = lock_holder(out)
    if holder is not None and holder != os.getpid():
        raise busy_error(out, holder)
    if not out.exists():
        return None
    check_audit_log(out)
    if force:
        check_force(out, inputs=consortium_inputs(config))
        return None
    if not resume:
        refuse_earlier_run(out, command="run")
        return None
    state = RunState.load(out)
    if state is None:
        raise ResumeError(f"{out}: no run to resume here ({STATE_FILE} missing); run the command without --resume")
    state.check_arguments(arguments, out=out)
    state.check_config(config_record(config), out=out)
    return state


def check_statistics_folder(out: Path, *, inputs: list[Path], force: bool, command: str = "stats") -> None:
    """What ``consortium stats`` (or ``command``: ``feasibility``) refuses in ``out`` before it writes a file
    (see :func:`check_run_folder`)."""
    holder = lock_holder(out)
    if holder is not None and holder != os.getpid():
        raise busy_error(out, holder)
    if not out.exists():
        return
    check_audit_log(out)
    if force:
        check_force(out, inputs=inputs)
    else:
        refuse_earlier_run(out, command=command)


def empty_run_folder(out: Path, *, inputs: list[Path], say: Callable[[str], None]) -> None:
    """``--force`` for a caller that writes into ``out`` before the run (the CLI's console log): empty it now,
    holding its lock, and say so in one line."""
    if not out.exists():
        return
    with run_lock(out, say=say):
        check_audit_log(out)  # a broken log is evidence: --force does not delete it either
        check_force(out, inputs=inputs)
        empty_for_force(out, say=say)


# -- the lock ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(out: Path, *, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """One run at a time in a run folder: a second one is refused with the holder's pid.

    The lock file records the holder's pid and start time and is removed on release. A lock whose holder
    is gone (it was killed: the file is left, its lock free; or a process it left behind still holds it)
    is taken over, and ``say`` is told in one line.
    """
    path = Path(out) / LOCK_FILE
    handle = _take(path, out=Path(out), say=say or log.warning)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(handle, path):
                path.unlink()  # released: the next command finds no lock, not a stale one
        handle.close()


def lock_holder(out: Path) -> int | None:
    """The pid of a live process that holds ``out``'s run lock, read without taking it (``None``: no lock,
    or a stale one)."""
    try:
        holder = _parse((Path(out) / LOCK_FILE).read_text())
    except OSError:
        return None
    return holder[0] if holder is not None and _alive(holder) else None


def busy_error(out: Path, holder: object) -> RunFolderError:
    return RunFolderError(
        f"{out}: another consortium run (pid {holder}) is writing to this folder; wait for it to end or give "
        "another --out"
    )


def _take(path: Path, *, out: Path, say: Callable[[str], None]) -> IO[str]:
    for _ in range(5):  # a holder may release (remove the file) or be taken over while this looks
        handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(_read(handle))
            if holder is None or _alive(holder):
                handle.close()
                raise busy_error(out, holder[0] if holder else "unknown") from None
            # its holder is gone, but a process it left behind still holds the file: a new file replaces it
            with contextlib.suppress(OSError):
                if _same_file(handle, path):
                    path.unlink()
            handle.close()
            say(f"{out}: took over the run lock of pid {holder[0]}, which is no longer running")
            continue
        if not _same_file(handle, path):  # its holder released it (removed the file) meanwhile
            handle.close()
            continue
        holder = _parse(_read(handle))
        if holder is not None:
            say(f"{out}: took over the run lock of pid {holder[0]}, which ended without releasing it")
        handle.seek(0)
        handle.truncate()
        handle.write(" ".join(str(v) for v in (os.getpid(), _start_time(os.getpid())) if v is not None))
        handle.flush()
        return handle
    raise RunFolderError(f"{path}: could not take the run folder's lock (it kept changing); run the command again")


def _read(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read()


def _parse(text: str) -> tuple[int, str | None] | None:
    """``(pid, start time)`` from a lock file's text; ``None`` when it names no pid."""
    fields = text.split()
    if not fields or not fields[0].isdigit():
        return None
    return int(fields[0]), (fields[1] if len(fields) > 1 else None)


def _alive(holder: tuple[int, str | None]) -> bool:
    """Whether the process recorded in a lock still runs: the pid exists and, where the start time was
    recorded, it is the same process (not a new one given the same pid)."""
    pid, started = holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return started is None or _start_time(pid) in (None, started)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (``/proc/PID/stat``, field 22); ``None`` off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False
