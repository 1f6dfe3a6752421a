"""What a run folder remembers between commands, so that ``consortium run --resume`` continues an
interrupted run instead of starting it over.

``<out>/run_state.json`` holds the run's arguments and, for each of its jobs (one per seed and fold),
its parts: the job that ran, and the jobs that continued it after an interruption. What the server
received in each part is kept under ``<out>/jobs/<key>/part<NN>/``, outside FLARE's workspaces (a POC
start wipes those): the published records and the last stored aggregate (ciphertext under HE). An
interrupted part keeps the records of the rounds its stored aggregate closes, no later ones: those
rounds are run again by the part that continues it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.store import aggregate_round
from schema.errors import UserError
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
KEPT_FOLDER = "jobs"
FINISHED, INTERRUPTED = "finished", "interrupted"


class ResumeError(UserError):
    """``--resume`` cannot continue what the run folder holds."""


@dataclass
class JobPart:
    """One FLARE job of a run's job: rounds ``first_round`` to ``rounds_done - 1`` are kept."""

    job_id: str
    status: str
    first_round: int
    rounds_done: int
    folder: str  # relative to the run folder


@dataclass
class RunState:
    """The run's arguments and, by job key (``seed<i>-fold<k>``), the parts of each job."""

    arguments: dict[str, Any]
    jobs: dict[str, list[JobPart]] = field(default_factory=dict)

    @classmethod
    def start(cls, out: Path, arguments: dict[str, Any]) -> RunState:
        """A new run in ``out``: what an earlier run kept there is removed."""
        shutil.rmtree(Path(out) / KEPT_FOLDER, ignore_errors=True)
        state = cls(arguments=arguments)
        state.save(out)
        return state

    @classmethod
    def load(cls, out: Path) -> RunState | None:
        path = Path(out) / STATE_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            jobs = {key: [JobPart(**part) for part in parts] for key, parts in data["jobs"].items()}
            return cls(arguments=data["arguments"], jobs=jobs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path}: unreadable run state ({exc}); start the run again without --resume") from None

    def save(self, out: Path) -> None:
        path = Path(out) / STATE_FILE
        temp = path.with_name(f".{STATE_FILE}.tmp")
        data = {"arguments": self.arguments, "jobs": {k: [asdict(p) for p in v] for k, v in self.jobs.items()}}
        temp.write_text(json.dumps(data, indent=2))
        temp.replace(path)

    def check_arguments(self, arguments: dict[str, Any], *, out: Path) -> None:
        """``--resume`` continues the run that was started: the same arguments, or a clear refusal."""
        differ = [k for k in sorted(set(self.arguments) | set(arguments)) if self.arguments.get(k) != arguments.get(k)]
        if differ:
            was = ", ".join(f"{k}={self.arguments.get(k)!r} (now {arguments.get(k)!r})" for k in differ)
            raise ResumeError(
                f"{out}: --resume continues the run started there with other arguments: {was}; give the same "
                "arguments, or start a new run in another --out"
            )

    def finished(self, key: str) -> bool:
        parts = self.jobs.get(key, [])
        return bool(parts) and parts[-1].status == FINISHED

    def next_round(self, key: str) -> int:
        """The round the job ``key`` continues at: 0 when nothing of it is kept."""
        parts = self.jobs.get(key, [])
        return parts[-1].rounds_done if parts else 0

    def last_aggregate(self, out: Path, key: str) -> Path | None:
        """The kept aggregate the job ``key`` continues from."""
        for part in reversed(self.jobs.get(key, [])):
            path = Path(out) / part.folder / GLOBAL_MODEL_FILE
            if path.exists():
                return path
        return None

    def interrupted(self) -> list[tuple[str, JobPart]]:
        return [(key, parts[-1]) for key, parts in self.jobs.items() if parts and parts[-1].status == INTERRUPTED]


def job_key(seed_index: int, fold: int | None) -> str:
    return f"seed{seed_index}" + ("" if fold is None else f"-fold{fold}")


def keep_part(
    state: RunState, out: Path, key: str, *, source: Path, job_id: str, first_round: int, finished: bool
) -> JobPart | None:
    """Copy what the server received in job ``job_id`` (under ``source``) to the run folder and record it.

    An interrupted job keeps the records of the rounds its last stored aggregate closes; with no stored
    aggregate nothing is kept (``None``) and the job starts over on ``--resume``."""
    model = stored_aggregate(source)
    last = aggregate_round(model) if model else None
    if not finished and last is None:
        log.warning("job %s stored no aggregate before it stopped: nothing to continue from", job_id)
        return None
    index = len(state.jobs.get(key, []))
    folder = Path(KEPT_FOLDER) / key / f"part{index:02d}"
    target = Path(out) / folder
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    lines = []
    for path in sorted(Path(source).rglob(PUBLISHED_FILE)):
        for line in path.read_text().splitlines():
            if line.strip() and (finished or int(json.loads(line).get("round") or 0) <= last):
                lines.append(line + "\n")
    (target / PUBLISHED_FILE).write_text("".join(lines))
    if model:
        shutil.copyfile(model, target / GLOBAL_MODEL_FILE)
    rounds_done = (last + 1) if last is not None else first_round
    part = JobPart(
        job_id=job_id,
        status=FINISHED if finished else INTERRUPTED,
        first_round=first_round,
        rounds_done=rounds_done,
        folder=str(folder),
    )
    state.jobs.setdefault(key, []).append(part)
    state.save(out)
    return part


def stored_aggregate(folder: Path) -> Path | None:
    """The last aggregate a job's server stored under ``folder`` (``None``: none yet)."""
    models = sorted(Path(folder).rglob(GLOBAL_MODEL_FILE)) if Path(folder).exists() else []
    return models[-1] if models else None


def stored_round(folder: Path) -> int | None:
    """The round of :func:`stored_aggregate` (``None``: none yet)."""
    model = stored_aggregate(folder)
    return aggregate_round(model) if model else None


def kept_folder(out: Path, key: str) -> Path:
    """Every part of the job ``key``: :func:`consortium.results.read_job` reads them as one job."""
    return Path(out) / KEPT_FOLDER / key
