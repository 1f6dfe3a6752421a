"""What a run folder remembers between commands, so that ``consortium run --resume`` continues an
interrupted run instead of starting it over.

``<out>/run_state.json`` holds the run's arguments and, for each of its jobs (one per seed and fold),
its parts: the job that ran, and the jobs that continued it after an interruption. What the server
received in each part is kept under ``<out>/jobs/<key>/part<NN>/``, outside FLARE's workspaces (a POC
start wipes those): the published records and the last stored aggregate (ciphertext under HE). An
interrupted part keeps the records of the rounds its stored aggregate closes, no later ones: those
rounds are run again by the part that continues it.

The state also records the config the run started with (:func:`config_record`: the parsed
``consortium.yaml`` with its digest, and the size and sha256 of each member's data file), so that
``--resume`` with an edited config is refused naming each change (:meth:`RunState.check_config`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.store import aggregate_round
from schema.errors import UserError
from schema.names import GLOBAL_MODEL_FILE, PUBLISHED_FILE
from schema.writes import atomic_write, writing

if TYPE_CHECKING:
    from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
KEPT_FOLDER = "jobs"
FINISHED, INTERRUPTED = "finished", "interrupted"
_CHUNK = 1 << 20


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
    config: dict[str, Any] | None = None  # :func:`config_record` of the config the run started with

    @classmethod
    def start(cls, out: Path, arguments: dict[str, Any], *, config: dict[str, Any]) -> RunState:
        """A new run in ``out``, which holds no earlier one (:func:`refuse_earlier_run`, or ``--force``
        emptied it): nothing is deleted here."""
        state = cls(arguments=arguments, config=config)
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
            return cls(arguments=data["arguments"], jobs=jobs, config=data.get("config"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path}: unreadable run state ({exc}); start the run again without --resume") from None

    def save(self, out: Path) -> None:
        jobs = {k: [asdict(p) for p in v] for k, v in self.jobs.items()}
        data = {"arguments": self.arguments, "config": self.config, "jobs": jobs}
        atomic_write(Path(out) / STATE_FILE, json.dumps(data, indent=2))

    def check_arguments(self, arguments: dict[str, Any], *, out: Path) -> None:
        """``--resume`` continues the run that was started: the same arguments, or a clear refusal."""
        differ = [k for k in sorted(set(self.arguments) | set(arguments)) if self.arguments.get(k) != arguments.get(k)]
        if differ:
            was = ", ".join(f"{k}={self.arguments.get(k)!r} (now {arguments.get(k)!r})" for k in differ)
            raise ResumeError(
                f"{out}: --resume continues the run started there with other arguments: {was}; give the same "
                "arguments, or start a new run (--force empties this folder, or give another --out)"
            )

    def check_config(self, record: dict[str, Any], *, out: Path) -> None:
        """``--resume`` continues the run with the config it started with: each change named, or nothing."""
        if self.config is None:
            raise ResumeError(
                f"{Path(out) / STATE_FILE}: the run was started by an older version that did not record its config, "
                "so --resume cannot check that consortium.yaml and the data are unchanged; start the run again "
                "(--force empties this folder)"
            )
        if self.config["digest"] == record["digest"] and _contents(self.config) == _contents(record):
            return
        changes = config_changes(self.config, record) or [
            f"config digest {self.config['digest'][:12]}... -> {record['digest'][:12]}..."
        ]
        listed = "".join(f"\n  {line}" for line in changes)
        raise ResumeError(
            f"{out}: --resume continues the run started there, but the config is not the one it started with:"
            f"{listed}\nRestore consortium.yaml and the data files as they were, or start a new run (--force "
            "empties this folder, or give another --out). Nothing was run or written"
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
    atomic_write(target / PUBLISHED_FILE, "".join(lines))
    if model:
        with writing(target / GLOBAL_MODEL_FILE) as temp:
            shutil.copyfile(model, temp)
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


# -- the config a run started with ---------------------------------------------------------------


def config_record(config: ConsortiumConfig) -> dict[str, Any]:
    """What ``--resume`` compares: the effective config by section (parsed, paths as given, ``source``
    left out), the sha256 of its canonical JSON, and the size and sha256 of each member's data file (and of
    the panel file, when the panel is one)."""
    sections = config.model_dump(mode="json", exclude={"source"})
    files = {f"members[{m.name}].data": file_digest(m.data) for m in config.members}
    if config.panel.file is not None:
        files["panel.file"] = file_digest(config.panel.file)
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"digest": hashlib.sha256(canonical.encode()).hexdigest(), "sections": sections, "files": files}


def file_digest(path: Path) -> dict[str, Any]:
    """``path``, its size and its sha256, read in chunks (``None`` for both when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
            size = handle.tell()
    except OSError:
        return {"path": str(path), "size": None, "sha256": None}
    return {"path": str(path), "size": size, "sha256": digest.hexdigest()}


def _contents(record: dict[str, Any]) -> dict[str, tuple]:
    return {key: (f["size"], f["sha256"]) for key, f in record["files"].items()}


def config_changes(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each difference between two :func:`config_record` s, one line each: a setting
    (``training.learning_rate: 0.001 -> 0.5``), a member or endpoint added, removed or renamed, a file changed."""
    before, after = was["sections"], now["sections"]
    lines: list[str] = []
    for section in [*before, *(k for k in after if k not in before)]:
        if section != "members":
            lines += _setting_changes(section, before.get(section, _UNSET), after.get(section, _UNSET))
    lines += _member_changes(before.get("members", []), after.get("members", []))
    lines += _endpoint_changes(before.get("members", []), after.get("members", []))
    for key, old in was["files"].items():
        new = now["files"].get(key)
        if new is None or (old["size"], old["sha256"]) == (new["size"], new["sha256"]):
            continue  # a member removed is named above
        if new["sha256"] is None:
            lines.append(f"{key}: {new['path']} cannot be read now")
        else:
            lines.append(
                f"{key}: {new['path']} changed since the run started (size {old['size']} -> {new['size']} bytes, "
                f"sha256 {str(old['sha256'])[:12]}... -> {new['sha256'][:12]}...)"
            )
    return lines


_UNSET = object()
_LISTED = 8  # a longer list (the panel's features) is named by what was added and removed


def _setting_changes(path: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [line for k in keys for line in _setting_changes(f"{path}.{k}", old.get(k, _UNSET), new.get(k, _UNSET))]
    if isinstance(old, list) and isinstance(new, list) and max(len(old), len(new)) > _LISTED:
        added, removed = [v for v in new if v not in old], [v for v in old if v not in new]
        parts = [f"{len(added)} added ({_few(added)})"] if added else []
        parts += [f"{len(removed)} removed ({_few(removed)})"] if removed else []
        return [f"{path}: {', '.join(parts) or 'the same items in another order'}"]
    return [f"{path}: {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(not set)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _few(values: list) -> str:
    return ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")


def _member_changes(before: list[dict], after: list[dict]) -> list[str]:
    was, now = {m["name"]: m for m in before}, {m["name"]: m for m in after}
    lines = [f"member '{name}' removed" for name in was if name not in now]
    lines += [f"member '{name}' added" for name in now if name not in was]
    for name in (n for n in was if n in now):
        lines += _setting_changes(
            f"members[{name}]",
            {k: v for k, v in was[name].items() if k != "tasks"},
            {k: v for k, v in now[name].items() if k != "tasks"},
        )
        old_tasks, new_tasks = ({t["name"]: t for t in m[name]["tasks"]} for m in (was, now))
        for task in (t for t in old_tasks if t in new_tasks):
            lines += _setting_changes(f"members[{name}].tasks[{task}]", old_tasks[task], new_tasks[task])
    return lines


def _endpoint_changes(before: list[dict], after: list[dict]) -> list[str]:
    """Endpoints added, removed or renamed (the same type, members and columns under another name), and
    endpoints whose members changed."""
    was, now = _endpoints(before), _endpoints(after)
    removed, added = [e for e in was if e not in now], [e for e in now if e not in was]
    lines = []
    for old in list(removed):
        new = next((e for e in added if now[e] == was[old]), None)
        if new is not None:
            lines.append(f"endpoint '{old}' renamed to '{new}'")
            removed.remove(old)
            added.remove(new)
    lines += [f"endpoint '{e}' removed (held by {', '.join(was[e]['held'])})" for e in removed]
    lines += [f"endpoint '{e}' added (held by {', '.join(now[e]['held'])})" for e in added]
    for name in (e for e in was if e in now and list(was[e]["held"]) != list(now[e]["held"])):
        lines.append(f"endpoint '{name}': held by {', '.join(was[name]['held'])} -> {', '.join(now[name]['held'])}")
    return lines


def _endpoints(members: list[dict]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for member in members:
        for task in member["tasks"]:
            entry = found.setdefault(task["name"], {"type": task["type"], "held": {}})
            entry["held"][member["name"]] = {k: v for k, v in task.items() if k != "name"}
    return found
