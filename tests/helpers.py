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


def console_script(
    args: list[str], *, timeout: float, prefix: list[str] = (), **options: Any
) -> subprocess.CompletedProcess:
    """``consortium ARGS`` through the installed console script, stdout and stderr piped (not a terminal),
    after ``prefix`` (``ip netns exec NS``: on another host, tests/netns.py); a process that does not exit
    within ``timeout`` seconds fails the test."""
    script = Path(sys.executable).with_name("consortium")
    return subprocess.run(
        [*prefix, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **options,
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


def start_site(kit: Path, *, env: dict[str, str] | None = None, prefix: list[str] = ()) -> subprocess.Popen:
    """Start a site from its own kit, as its operator would: ``startup/sub_start.sh`` (it runs ``python3``
    from PATH, so this interpreter's folder goes first), after ``prefix`` (``ip netns exec NS``: on another
    host, tests/netns.py)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    log = open(kit / "console.txt", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [*prefix, "bash", str(kit / "startup" / "sub_start.sh")],
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


def listening(port: int, *, pid: int | None = None) -> bool:
    """Whether a process on this machine listens on ``port`` (read from /proc: no connection is made); with
    ``pid``, in that process's network namespace."""
    net = Path("/proc") / (str(pid) if pid else "self") / "net"
    for table in (net / "tcp", net / "tcp6"):
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    return True
    return False


@contextlib.contextmanager
def running_kits(config_path: Path, kits: Path, *, he: bool = True, timeout: float = 120):
    """A consortium provisioned from ``config_path`` into ``kits`` (with the key ceremony when ``he``, and
    every member's mask key under secure aggregation), its server and every member site started from their
    own kits on loopback (each site reads ``CONSORTIUM_CONFIG``); yields the config once every member is
    connected, stops them all on the way out. The config's operator ports must be free (:func:`free_ports`)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from consortium.cli import main as cli
    from provisioning.project import member_lead
    from schema.config import load_config

    config = load_config(config_path)
    steps = [["provision", "--config", str(config_path), "--out", str(kits)]]
    if he:
        keys = kits.parent / f"{kits.name}-keys"
        steps += [
            ["keys", "create", "--config", str(config_path), "--out", str(keys)],
            ["keys", "install", "--config", str(config_path), "--kits", str(kits), "--keys", str(keys)],
        ]
    if config.secure_aggregation():  # every member's mask key on this one machine (each member's own step)
        steps.append(["keys", "masks", "--config", str(config_path), "--kits", str(kits)])
    for step in steps:
        assert cli(step) == 0, f"consortium {' '.join(step)} failed"
    operator = config.operator
    processes = [start_site(kits / operator.host)]
    try:
        wait_until(
            lambda: listening(operator.fl_port) and listening(operator.admin_port),
            timeout=timeout,
            what="the server to listen",
        )
        for member in config.members:
            processes.append(start_site(kits / member.name, env={"CONSORTIUM_CONFIG": str(config_path)}))
        lead = member_lead(config.members[0])
        session = new_secure_session(lead, str(kits / lead), timeout=60)
        try:
            wait_until(
                lambda: len(session.get_system_info().client_info) >= len(config.members),
                timeout=timeout,
                interval=1,
                what="every member site to connect",
            )
        finally:
            session.close()
        yield config
    finally:
        for process in reversed(processes):
            stop_site(process)
        stop_job_processes(kits)


def release_random_model(
    config_path: Path, out: Path, *, shared: dict[str, str], seed: int = 7, target: tuple[float, float] = (5.0, 2.0)
) -> dict[str, Any]:
    """A synthetic consortium whose endpoints of the given types (``{"survival": "pfs"}``) are renamed to
    be shared, a seeded random shared model released and registered as a run would, and each member's
    ``scaling.json`` written as its site writes it (regression targets: ``target`` = mean, scale).

    Returns ``config``, ``model`` (the SharedModel), ``report``, ``run_id``, ``uri`` (tracking) and
    ``scaling`` (member -> path)."""
    from consortium.results import Released
    from consortium.shared_model import log_shared_model, tracking_uri_for
    from jobs.member_data import load_member
    from jobs.recipe import server_model
    from jobs.site_outputs import SiteOutputs
    from models.network import SharedModel
    from schema.config import load_config

    raw = yaml.safe_load(Path(config_path).read_text())
    for member in raw["members"]:
        for task in member["tasks"]:
            task["name"] = shared.get(task["type"], task["name"])
    Path(config_path).write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(config_path)
    model = SharedModel(**{**server_model(config)["args"], "seed": seed}).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    report = {"job_id": "job-1", "privacy": {"he": True, "dp": False}, "timing": {"rounds": 1}, "env": "kits"}
    report |= {"members": {}, "tracking": {}}
    records = {
        m.name: [
            {"site": m.name, "round": 0, "train_loss": 1.5, "val": {"pfs": {"c_index": 0.6}}, "samples": {"train": 40}}
        ]
        for m in config.members
    }
    uri = tracking_uri_for(config, out=out)
    run_id = log_shared_model(config, Released(state=state), report=report, tracking_uri=uri, member_records=records)
    scaling = {}
    for member in config.members:
        regression = [t.name for t in member.tasks if t.type == "regression"]
        outputs = SiteOutputs(Path(out) / "sites" / member.name)
        outputs.save_scaling(load_member(config, member.name).scaling, targets={name: target for name in regression})
        scaling[member.name] = outputs.scaling_path
    return {"config": config, "model": model, "report": report, "run_id": run_id, "uri": uri, "scaling": scaling}


def binary_statistics(features: list[str], *, measured: int = 30, seed: int = 0):
    """An :class:`omics.statistics.EndpointStatistics` of a binary endpoint over ``features`` from summed pieces
    of a one-column design (endpoint only): 80 samples, 24 in the class, one member; the features after the
    first ``measured`` no member measured (absent from the table)."""
    import numpy as np

    from omics.design import DesignSpec
    from omics.statistics import endpoint_statistics

    rng = np.random.default_rng(seed)
    n = len(features)
    kept = np.arange(n) < measured
    effect = np.resize(rng.normal(size=measured), n)
    summed = {
        "xtx": np.full(n, 80 * 0.3 * 0.7),
        "xty": np.where(kept, 80 * 0.3 * 0.7 * effect, 0.0),
        "yty": np.where(kept, 80.0 + 80 * 0.3 * 0.7 * effect**2, 0.0),
        "ysum": np.where(kept, 160.0, 0.0),
        "samples": np.where(kept, 80.0, 0.0),
        "members": kept.astype(float),
    }
    return endpoint_statistics(summed, kind="binary", spec=DesignSpec(formula="~ endpoint"), feature_names=features)


def run_notebook(notebook: Path, out: Path, **parameters: Any) -> dict[str, Any]:
    """Execute ``notebook`` with papermill (``parameters`` injected) into ``out``; returns its errors, the
    text it printed and the number of PNG images it showed."""
    import papermill

    executed = papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters=parameters,
        cwd=str(notebook.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
    return {
        "errors": [o for o in outputs if o.output_type == "error"],
        "text": "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        + "".join(o.get("data", {}).get("text/plain", "") for o in outputs if o.output_type == "display_data"),
        "images": sum("image/png" in o.get("data", {}) for o in outputs),
    }
