"""Helpers the test modules share (a test module never imports another one): waiting on a condition, a
consortium.yaml moved to a test's folder, a server's run folder as FLARE leaves it, POC kits and their
records, the console script, and provisioned sites started from their kits on loopback.

What needs torch or NVFlare is imported inside the helper that uses it: a module that only waits loads neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "the condition",
    stop: threading.Event | None = None,
) -> T | None:
    """Ask ``predicate`` every ``interval`` seconds until it returns something true, and return that.

    Orders a test's events on what happened, not on how long it usually takes. ``TimeoutError`` naming
    ``what`` after ``timeout`` seconds; ``None`` as soon as ``stop`` is set (the run being watched ended).
    """
    deadline = time.monotonic() + timeout
    while stop is None or not stop.is_set():
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        if stop is None:
            time.sleep(interval)
        else:
            stop.wait(interval)
    return None


def relocated_config(config: Path, folder: Path, *, name: str = "consortium.yaml", **changes: dict) -> Path:
    """A copy of ``config`` written to ``folder / name`` that still finds the members' data and the panel
    (their paths made absolute); each keyword is a section whose values are merged into the copy's
    (``training={"rounds": 3}``, ``privacy={"dp": {"enabled": True}}``)."""
    raw = yaml.safe_load(config.read_text())
    if "file" in raw.get("panel", {}):
        raw["panel"]["file"] = str(config.parent / raw["panel"]["file"])
    for member in raw["members"]:
        member["data"] = str(config.parent / member["data"])
    _merge(raw, changes)
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _merge(into: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def server_folder(root: Path, *, rounds_recorded: dict[str, int], stored_round: int | None, first: int = 0) -> Path:
    """A server's run folder as FLARE leaves it: published records by site, the last stored aggregate."""
    import numpy as np

    from jobs.store import write_aggregate

    app = root / "job-x" / "app_server"
    app.mkdir(parents=True)
    lines = [
        json.dumps({"site": site, "round": r, "total_rounds": 4})
        for site, upto in rounds_recorded.items()
        for r in range(first, upto)
    ]
    (root / "job-x" / PUBLISHED_FILE).write_text("".join(line + "\n" for line in lines))
    if stored_round is not None:
        write_aggregate(app / GLOBAL_MODEL_FILE, meta={}, params={"trunk.w": np.ones(3)}, round_=stored_round)
    return root / "job-x"


def poc_kit(flare: Path, site: str) -> Path | None:
    """The POC kit of ``site`` (the server is ``localhost``) under a run's ``flare`` folder. Look it up when it
    is needed: FLARE builds the kits in a folder of its own first, then moves them."""
    with contextlib.suppress(OSError):  # FLARE writes and moves folders while this looks
        return next((k for k in flare.rglob(site) if (k / "startup").is_dir()), None)
    return None


def updates_received(folder: Path, site: str) -> int:
    """How many updates of ``site`` the server recorded under ``folder``; 0 while a job folder that FLARE
    moves into its job store (at the job's end) goes from under the look."""
    from consortium.results import read_records

    with contextlib.suppress(OSError):
        return len(read_records(folder).get(site, []))
    return 0


def console_script(args: list[str], *, timeout: float, **options: Any) -> subprocess.CompletedProcess:
    """``consortium ARGS`` through the installed console script, stdout and stderr piped (not a terminal);
    a process that does not exit within ``timeout`` seconds fails the test."""
    script = Path(sys.executable).with_name("consortium")
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **options
    )


# -- provisioned kits on loopback ------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on loopback now (for a provisioned server's ``fl_port`` and ``admin_port``)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_site(kit: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a site from its own kit, as its operator would: ``startup/sub_start.sh`` (it runs ``python3``
    from PATH, so this interpreter's folder goes first)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    log = open(kit / "console.txt", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        ["bash", str(kit / "startup" / "sub_start.sh")],
        cwd=kit,
        env={**os.environ, "PATH": path, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: job processes die with it
    )


def stop_site(process: subprocess.Popen) -> None:
    """End a site started with :func:`start_site` and its process group: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_job_processes(kits: Path) -> None:
    """Job processes (SJ/CJ) start in sessions of their own; find them by their kit path and end them."""
    marker = str(kits).encode()
    for _ in range(2):
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            return
        time.sleep(1)


def listening(port: int) -> bool:
    """Whether a process on this machine listens on ``port`` (read from /proc: no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    return True
    return False
