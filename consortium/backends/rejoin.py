"""POC: a member restarted while a job runs takes part again from the next round.

NVFlare 2.9 does not hand a running job to a client that logged in again: a member whose client
process died and was started again (its kit's ``start.sh``) sits idle until the next job. On POC
every process runs on this machine, so the command sees it: the member's client (``client_train``
of its kit) is alive again, its job process (``worker_process`` of its kit running this job id) is
gone, and it has not sent the job's last round. :class:`RejoinWatch` says so once the job has stored
a round of its own (so every continuation moves the run forward); the POC backend
(:mod:`consortium.backends.poc`) then keeps what the server stored (:func:`snapshot_job`), ends the job,
and the run continues it at the next round with every member, as ``--resume`` does
(``consortium.run_state``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from consortium.results import read_records
from consortium.run_state import stored_aggregate, stored_round
from schema.config import ConsortiumConfig
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

CLIENT_PROCESS = "client_train"  # the module a POC kit's start.sh runs (``python -m ....client_train -m KIT``)
JOB_PROCESS = "worker_process"  # the module a client starts per job (``... -m KIT ... -n JOB_ID``)


@dataclass
class MemberProcesses:
    """What runs on this machine for one member's kit: its client, and the job ids its job processes run."""

    client: bool = False
    jobs: set[str] = field(default_factory=set)


def _flare_process(args: list[str]) -> tuple[str, dict[str, str]] | None:
    """``(module's last name, its options)`` of a ``python -m <FLARE module> ...`` command line."""
    if "-m" not in args[:-1]:
        return None
    at = args.index("-m") + 1
    options = {flag: value for flag, value in zip(args[at + 1 :], args[at + 2 :], strict=False) if flag.startswith("-")}
    return args[at].rsplit(".", 1)[-1], options


def member_processes(kits: dict[str, Path]) -> dict[str, MemberProcesses]:
    """By member, its FLARE processes found in ``/proc`` (``kits``: member -> its POC kit folder)."""
    by_kit = {str(path): member for member, kit in kits.items() for path in (Path(kit), Path(kit).resolve())}
    found = {member: MemberProcesses() for member in kits}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            process = _flare_process(
                [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
            )
            member = by_kit.get(process[1].get("-m", "")) if process else None
            if member is None:
                continue
            if process[0] == CLIENT_PROCESS:
                found[member].client = True
            elif process[0] == JOB_PROCESS and process[1].get("-n"):
                found[member].jobs.add(process[1]["-n"])
    return found


class RejoinWatch:
    """Called while a POC job runs: the name of a member that came back after its job process died."""

    def __init__(self, config: ConsortiumConfig, prod: Path, *, job_id: str, rounds: int) -> None:
        self.kits = {m.name: prod / m.name for m in config.members}
        self.server_run = prod / config.operator.host / job_id
        self.job_id, self.rounds = job_id, rounds
        self.in_job: set[str] = set()  # members seen running this job (a process, or a record)
        self.member: str | None = None  # the member that came back, once seen

    def __call__(self) -> str | None:
        processes = member_processes(self.kits)
        records = read_records(self.server_run) if self.server_run.exists() else {}
        self.in_job |= {m for m, p in processes.items() if self.job_id in p.jobs} | {m for m in records if records[m]}
        if stored_round(self.server_run) is None:
            return None  # a continuation must start after a round this job stored
        for member, found in processes.items():
            back = found.client and self.job_id not in found.jobs
            if member in self.in_job and back and len(records.get(member, [])) < self.rounds:
                log.info("member %s logged in again without job %s: it rejoins at the next round", member, self.job_id)
                self.member = member
                return member
        return None


def snapshot_job(server_run: Path, target: Path) -> Path:
    """Copy what the job's server stored (the last aggregate, then the published records) to ``target``
    before the job is ended: FLARE moves an ended job's folder into its job store."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    model = stored_aggregate(server_run)
    if model:  # the aggregate first: records of a round stored after it are left out when kept
        shutil.copyfile(model, target / GLOBAL_MODEL_FILE)
    for path in sorted(server_run.rglob(PUBLISHED_FILE)):
        copy = target / path.relative_to(server_run)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return target
