"""The provisioned kits across separate hosts: the server, each member and the lead who submits the job on
hosts of their own (Linux network namespaces on a private bridge, tests/netns.py), every one of them finding
the server by the host name its kit was provisioned with (``server.consortium.test``), as DNS would.

- a member whose link goes down mid-run drops out (``training.min_members``) and the encrypted job completes
  without it;
- a member whose link comes back answers again before the run ends, and the report says when; every member
  reached the server from its own host's address (one case of each: two kits runs of 3-4 min on 2 cores).

Skipped where namespaces cannot be made (not root, no CAP_NET_ADMIN, no ``ip``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from provisioning.project import member_lead
from schema.config import ConsortiumConfig, load_config
from tests.helpers import (
    console_script,
    free_ports,
    listening,
    start_site,
    stop_job_processes,
    stop_site,
    updates_received,
    wait_until,
)
from tests.netns import PrivateNetwork, cannot_make_namespaces

pytestmark = pytest.mark.slow

SERVER = "server.consortium.test"
LEAD = "lead"  # the host of the lead who submits the job (pharma-a's lead)
MEMBERS = ["pharma-a", "pharma-b", "pharma-c"]
OUTAGE = "pharma-c"
CONNECTION = re.compile(r"Connection \[\S+ \S+ <= (?P<address>[\d.]+):\d+ SSL (?P<site>\S+)\] is created")
ROUND_DEADLINE = 30.0
"""Seconds a round waits for a member beyond ``min_members``; each round a member misses costs that much.
The slowest round here (round 0, every site starting its job process on two loaded cores) takes ~20 s."""


@pytest.fixture
def network() -> Iterator[PrivateNetwork]:
    """A host for the server, one per member and one for the lead; removed whatever the test did. The test
    is skipped, saying why, where namespaces cannot be made."""
    why_not = cannot_make_namespaces()
    if why_not:
        pytest.skip(f"separate hosts need Linux network namespaces: {why_not}")
    hosts = {SERVER: [SERVER], **{m: [] for m in MEMBERS}, LEAD: []}
    with PrivateNetwork(hosts) as made:
        yield made
    assert not made.leftovers()


def _consortium(folder: Path, *, training: dict) -> Path:
    cfg = synthesize(folder, sizes=[120, 120, 120], n_features=150, seed=1, rounds=training["rounds"])
    raw = yaml.safe_load(cfg.read_text())
    fl_port, admin_port = free_ports(2)  # the server's namespace has ports of its own; any free pair will do
    raw["operator"] = {**raw["operator"], "host": SERVER, "fl_port": fl_port, "admin_port": admin_port}
    raw["privacy"]["he"]["enabled"] = True
    raw["training"] |= {"round_deadline": ROUND_DEADLINE, "local_epochs": 1, **training}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


CONNECTED = """
import sys
from nvflare.fuel.flare_api.flare_api import new_secure_session
from tests.helpers import wait_until
kit, user, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
session = new_secure_session(user, kit, timeout=60)
try:
    wait_until(lambda: len(session.get_system_info().client_info) >= count, timeout=180, interval=1,
               what=f"{count} member sites to connect")
finally:
    session.close()
"""


@contextlib.contextmanager
def _running(network: PrivateNetwork, cfg: Path, kits: Path) -> Iterator[ConsortiumConfig]:
    """The consortium of ``cfg`` provisioned into ``kits`` (key ceremonies included), its server and members
    started from their kits, each on its own host; yields the config once the lead sees every member."""
    config = load_config(cfg)
    keys, public = kits.parent / "keys", kits.parent / "mask-public"
    steps = [
        ["provision", "--config", str(cfg), "--out", str(kits)],
        ["keys", "create", "--config", str(cfg), "--out", str(keys)],
        ["keys", "install", "--config", str(cfg), "--kits", str(kits), "--keys", str(keys)],
    ]
    if config.secure_aggregation():  # each member on its own kit: its public file, then (again) the list
        masks = [
            ["keys", "masks", "--config", str(cfg), "--kit", str(kits / m.name), "--public", str(public)]
            for m in config.members
        ]
        steps += [*masks, *masks, ["keys", "verify", "--config", str(cfg), "--kits", str(kits)]]
    for step in steps:
        assert cli(step) == 0, f"consortium {' '.join(step)} failed"
    server = start_site(kits / SERVER, prefix=network.prefix(SERVER))
    processes = [server]
    try:
        ports = (config.operator.fl_port, config.operator.admin_port)
        wait_until(lambda: all(listening(p, pid=server.pid) for p in ports), timeout=120, what="the server to listen")
        for member in config.members:
            env = {"CONSORTIUM_CONFIG": str(cfg)}
            processes.append(start_site(kits / member.name, env=env, prefix=network.prefix(member.name)))
        lead = member_lead(config.members[0])
        seen = subprocess.run(
            [*network.prefix(LEAD), sys.executable, "-c", CONNECTED, str(kits / lead), lead, str(len(MEMBERS))],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=Path(__file__).resolve().parents[2],  # tests.helpers importable
        )
        assert seen.returncode == 0, seen.stderr[-3000:] + _tail(kits)
        yield config
    finally:
        for process in reversed(processes):
            stop_site(process)
        stop_job_processes(kits)


def _tail(kits: Path) -> str:
    parts = []
    for path in sorted(kits.glob("*/log.txt")) + sorted(kits.glob("*/console.txt")):
        with contextlib.suppress(OSError):
            parts.append(f"\n--- {path}\n{path.read_text(errors='replace')[-2500:]}")
    return "".join(parts)[-15000:]


def _submit(network: PrivateNetwork, cfg: Path, kits: Path, out: Path) -> subprocess.CompletedProcess:
    """``consortium run --env kits`` by pharma-a's lead, on the lead's host."""
    admin = kits / member_lead(load_config(cfg).members[0])
    args = ["run", "--config", str(cfg), "--env", "kits", "--startup-kit", str(admin), "--out", str(out), "--json"]
    return console_script(args, timeout=540, prefix=network.prefix(LEAD))


def _report(done: subprocess.CompletedProcess, out: Path, kits: Path) -> dict:
    console = out / "console.log"
    detail = done.stderr[-3000:] + (console.read_text(errors="replace")[-3000:] if console.is_file() else "")
    assert done.returncode == 0, detail + _tail(kits)
    report = json.loads((out / "report.json").read_text())
    assert report["env"] == "kits" and report["privacy"]["he"] is True
    return report


def _member_addresses(kits: Path) -> dict[str, str]:
    """Each member's address as the server's connections came from it, from the server's log
    (``Connection [CN00003 10.88.0.10:45197 <= 10.88.0.11:38622 SSL pharma-a] is created``)."""
    found = {}
    for line in (kits / SERVER / "log.txt").read_text(errors="replace").splitlines():
        made = CONNECTION.search(line)
        if made and made["site"] in MEMBERS:
            found[made["site"]] = made["address"]
    return found


class Outage(threading.Thread):
    """Take ``member``'s link down once the server has recorded its update of round 0; with ``mend``, up
    again once the other members have sent an update of the round after the first one it missed (the server
    went on without it). A thread of the test: the command runs in a process of its own."""

    def __init__(self, network: PrivateNetwork, server: Path, member: str, *, mend: bool, done: threading.Event):
        super().__init__(name=f"outage-{member}", daemon=True)
        self.network, self.server, self.member, self.mend_it, self.done = network, server, member, mend, done
        self.sent_before: int | None = None  # the member's updates the server had when its link went down
        self.cut_at: float | None = None
        self.mended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._outage()
        except BaseException as exc:  # seen by the test, not lost with the thread
            self.error = exc

    def _outage(self) -> None:
        if not self._wait(lambda: updates_received(self.server, self.member) > 0, "its round-0 update"):
            return
        self.network.cut(self.member)
        self.cut_at = time.monotonic()
        self.sent_before = updates_received(self.server, self.member)
        if not self.mend_it:
            return
        others = [m for m in MEMBERS if m != self.member]
        past = self.sent_before + 1  # the first round it missed is sent_before: one more, and it is over
        if self._wait(lambda: all(updates_received(self.server, m) > past for m in others), "a round without it"):
            self.network.mend(self.member)
            self.mended_at = time.monotonic()

    def _wait(self, predicate, what: str) -> bool:
        got = wait_until(predicate, timeout=600, interval=0.05, what=f"{what} ({self.member})", stop=self.done)
        return bool(got)


def _run_with_an_outage(network, tmp_path, *, rounds: int, mend: bool) -> tuple[dict, Outage, str]:
    """A run of ``rounds`` with ``min_members: 2`` during which :data:`OUTAGE`'s link goes down (and with
    ``mend`` comes back): the report, the outage, the report.md."""
    cfg = _consortium(tmp_path / "c", training={"rounds": rounds, "min_members": 2})
    kits, out = tmp_path / "kits", tmp_path / "run"
    with _running(network, cfg, kits):
        done = threading.Event()
        outage = Outage(network, kits / SERVER, OUTAGE, mend=mend, done=done)
        outage.start()
        try:
            run = _submit(network, cfg, kits, out)
        finally:
            done.set()
            outage.join(timeout=60)
    if outage.error is not None:
        raise outage.error
    assert outage.cut_at is not None, f"the run ended before {OUTAGE}'s link went down\n{run.stderr[-3000:]}"
    return _report(run, out, kits), outage, (out / "report.md").read_text()


def test_a_member_whose_link_goes_down_drops_out_and_the_run_completes(network, tmp_path):
    rounds = 3
    report, outage, markdown = _run_with_an_outage(network, tmp_path, rounds=rounds, mend=False)
    missed = outage.sent_before
    assert missed < rounds, "the member had sent every round when its link went down: nothing to miss"
    assert report["dropped"] == {OUTAGE: missed}
    assert not report.get("rejoined")
    others = sorted(m for m in MEMBERS if m != OUTAGE)
    assert [sorted(r["sites"]) for r in report["rounds"]] == [MEMBERS] * missed + [others] * (rounds - missed)
    assert report["members"][OUTAGE]["tasks"]["c_pfs"]["federated"] is None  # no last round from it
    assert report["members"]["pharma-a"]["tasks"]["a_pfs"]["federated"] is not None
    assert f"{OUTAGE} dropped out in round {missed}**: no update from it from then on" in markdown


def test_a_member_whose_link_comes_back_answers_again(network, tmp_path):
    rounds = 4
    report, outage, markdown = _run_with_an_outage(network, tmp_path, rounds=rounds, mend=True)
    assert outage.mended_at is not None, "the run ended before the link came back"
    missed = outage.sent_before
    assert report["dropped"] == {OUTAGE: missed}
    back = report["rejoined"][OUTAGE]
    assert missed < back < rounds
    assert OUTAGE in report["rounds"][back]["sites"] and OUTAGE not in report["rounds"][missed]["sites"]
    assert report["members"][OUTAGE]["tasks"]["c_pfs"]["federated"] is not None  # it answered the last round
    assert f"no update from it until round {back}, when it answered again" in markdown
    for member in MEMBERS:  # every member answered the last round: each of its endpoints has a federated figure
        tasks = report["members"][member]["tasks"]
        assert len(tasks) == 3 and all(t["federated"] is not None for t in tasks.values()), (member, tasks)
    # each member reached the server from its own host's address, not over loopback
    assert _member_addresses(tmp_path / "kits") == {m: network.addresses[m] for m in MEMBERS}
