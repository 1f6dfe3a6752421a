"""What the operator's server received in a job, read back from the job's folder, and its release.

A job's folder (the simulator's workspace, a POC result, or what ``nvflare job download`` fetched from
provisioned kits) holds, somewhere under the server's run folder:

- ``published.jsonl``: one record per site and round, as :class:`jobs.published.PublishedResultsRecorder`
  wrote it (validation figures each round; test figures with intervals in the last);
- ``FL_global_model.sections``: the last aggregate: trunk, shared heads, the summed association
  statistics and attribution vectors; plaintext, or ciphertext that only a member's secret context opens.

- ``digests.jsonl``: the server's receipt, as each round completed, of the aggregate it stored and the
  records so far (:mod:`jobs.published`).

:func:`verify_digests` checks the folder against that receipt. :func:`release` opens the aggregate
(under HE only with the key the aggregate records, then decrypting it with a member's context) and turns
it into the shared model's state, each endpoint's association table and each endpoint's consensus
ranking, once the counts it opened are plausible.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobs.he.context import context_from_bytes, public_fingerprint
from jobs.he.payload import decrypt_update
from jobs.published import DIGESTS_FILE, KIND_ROUND, file_digest
from jobs.sections import finalize, select
from jobs.store import read_aggregate
from models.attribution import ranking_from_vector
from models.network import HEAD_PREFIX, TRUNK_PREFIX
from omics.design import DesignSpec
from omics.statistics import EndpointStatistics, endpoint_statistics
from schema import settings
from schema.config import ConsortiumConfig
from schema.errors import UserError
from schema.names import CLIENT_CONTEXT_FILE, GLOBAL_MODEL_FILE, PUBLISHED_FILE

log = logging.getLogger(__name__)


class ResultsError(UserError):
    """A job folder lacks what the server should have kept, or the aggregate cannot be opened."""


class IntegrityError(ResultsError):
    """What a job folder holds is not what its server recorded, or not what the key opens (exit 1): a file
    edited or from another job, another job than the one named, the wrong key, implausible counts."""

    exit_code = 1


@dataclass
class JobResults:
    """The records the server received, by site (in round order), and where the aggregate lies."""

    folder: Path
    records: dict[str, list[dict[str, Any]]]
    global_model: Path | None

    def dropped(self, members: list[str], total: int) -> dict[str, int]:
        """Members that did not answer every round: the first round the server got nothing from them.
        Rounds count from the first one any site reported (a continuing job's folder alone starts later)."""
        start = min((int(r.get("round") or 0) for rs in self.records.values() for r in rs), default=0)
        missing = {m: sorted(set(range(start, total)) - self._rounds(m)) for m in members}
        return {m: rounds[0] for m, rounds in missing.items() if rounds}

    def rejoined(self, members: list[str], total: int) -> dict[str, int]:
        """Members that answered again after missing rounds (a job continuing an interrupted one includes
        every member): the round they came back in."""
        back = {}
        for member, first_missing in self.dropped(members, total).items():
            later = sorted(r for r in self._rounds(member) if r > first_missing)
            if later:
                back[member] = later[0]
        return back

    def finished(self, members: list[str], total: int) -> list[str]:
        """Members that answered the last round (the one with the test figures)."""
        return [m for m in members if total - 1 in self._rounds(m)]

    def _rounds(self, member: str) -> set[int]:
        return {int(r.get("round") or 0) for r in self.records.get(member, [])}

    def rounds_done(self) -> int:
        """Rounds every site has reported (0 when a site has reported none)."""
        return min((len(r) for r in self.records.values()), default=0)


@dataclass
class Released:
    """The aggregate, opened: shared state, and per endpoint its statistics and consensus ranking."""

    state: dict[str, np.ndarray]
    statistics: dict[str, pd.DataFrame] = field(default_factory=dict)
    rankings: dict[str, pd.DataFrame] = field(default_factory=dict)
    details: dict[str, EndpointStatistics] = field(default_factory=dict)
    """Per endpoint: withheld rows, the design, subgroups by region, the Cox fit's convergence."""
    he_fingerprint: str | None = None
    """Encrypted aggregates: the fingerprint of the key it was encrypted for (checked against the key used)."""
    scaling: dict[str, np.ndarray] = field(default_factory=dict)
    """The summed ``scaling.*`` pieces: the consortium's pooled scaling (:func:`consortium.registry.pooled_scaling`)."""
    feasibility: dict[str, np.ndarray] = field(default_factory=dict)
    """The summed ``feasibility.*`` count vectors (``consortium feasibility``), still reals under HE."""


def read_records(folder: Path, *, exclude: frozenset[Path] = frozenset()) -> dict[str, list[dict[str, Any]]]:
    """The published records under ``folder`` by site (files in ``exclude`` skipped, e.g. earlier jobs');
    a record being written is skipped."""
    records: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(set(Path(folder).rglob(PUBLISHED_FILE)) - exclude):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                record = json.loads(line)
                records.setdefault(str(record.get("site")), []).append(record)
    for site in records:
        records[site].sort(key=lambda r: int(r.get("round") or 0))
    return records


def read_job(folder: Path, *, config: ConsortiumConfig) -> JobResults:
    """Read a finished job's folder; a :class:`ResultsError` names what is missing and why."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsError(f"{folder}: no such job folder; download the job first (nvflare job download)")
    records = read_records(folder)
    models = sorted(folder.rglob(GLOBAL_MODEL_FILE))
    if not set(records) & {m.name for m in config.members}:
        raise ResultsError(
            f"{folder}: the server received nothing from any member of {config.name}; was this job run with "
            "this consortium.yaml?"
        )
    return JobResults(folder=folder, records=records, global_model=models[-1] if models else None)


def release(results: JobResults, config: ConsortiumConfig, *, client_context: bytes | Path | None = None) -> Released:
    """Open the last aggregate; under HE ``client_context`` (a member's secret context) is required."""
    if results.global_model is None:
        raise ResultsError(f"{results.folder}: no {GLOBAL_MODEL_FILE}; did the job finish its last round?")
    stored = read_aggregate(results.global_model)
    if stored.encrypted is not None:
        if client_context is None:
            raise ResultsError(
                f"{results.global_model} is encrypted: a member's key custodian releases it with the secret "
                f"context (--client-context <member kit>/startup/{CLIENT_CONTEXT_FILE})"
            )
        data = Path(client_context).read_bytes() if isinstance(client_context, Path) else client_context
        source = str(client_context)[:200] if isinstance(client_context, Path) else "the secret context given"
        context = context_from_bytes(data, source=source, private=True)
        check_key(context, stored.he_fingerprint, source=source, aggregate=results.global_model)
        summed = decrypt_update(context, stored.encrypted)
    else:
        summed = stored.params
    plain = finalize(summed, stored.meta)
    check_plausible(plain, config, records=results.records, aggregate=results.global_model)
    details = open_statistics(plain, config, features=config.panel_features())  # the omics panel only
    statistics = {name: detail.table for name, detail in details.items()}
    rankings = {}
    inputs = config.model_features()  # the model's inputs: the panel, then the clinical inputs
    for name, values in select(plain, "consensus").items():
        members = np.maximum(np.round(values["members"]), 1.0)
        rankings[name] = ranking_from_vector(inputs, values["score"] / members, frequency=values["frequency"] / members)
    state = {k: v for k, v in plain.items() if k.startswith((TRUNK_PREFIX, HEAD_PREFIX))}
    scaling = {k: np.asarray(v, dtype=np.float64) for k, v in plain.items() if k.startswith("scaling.")}
    return Released(
        state=state,
        statistics=statistics,
        rankings=rankings,
        details=details,
        he_fingerprint=stored.he_fingerprint,
        scaling=scaling,
        feasibility={k: np.asarray(v, dtype=np.float64) for k, v in plain.items() if k.startswith("feasibility.")},
    )


def check_key(context, recorded: str | None, *, source: str, aggregate: Path) -> None:
    """The custodian's key must be the one the aggregate was encrypted for (its recorded fingerprint)."""
    found = public_fingerprint(context)
    if recorded is None:
        raise IntegrityError(
            f"{aggregate}: records no fingerprint of the key it was encrypted for, so the key in {source} cannot "
            "be checked against it; release a job stored by this version of the server"
        )
    if found != recorded:
        raise IntegrityError(
            f"the key in {source} has fingerprint {found[:16]}..., the job was encrypted for {recorded[:16]}...: "
            "use the key of the ceremony this consortium's kits were provisioned with"
        )


COUNT_TOLERANCE = 0.05
"""How far an opened count may lie from a whole number: CKKS noise is ~1e-5 on a count; a wrong key or a
damaged aggregate gives numbers of the order of the modulus."""


def check_plausible(
    plain: dict[str, np.ndarray], config: ConsortiumConfig, *, records: dict[str, list[dict]], aggregate: Path
) -> None:
    """Refuse an opened aggregate whose counts cannot be: every ``members`` count a whole number within
    [0, members of the consortium], every ``samples`` count within [0, the samples the records published]."""
    members = len(config.members)
    total = published_samples(records)
    for key in sorted(plain, key=lambda k: not k.endswith(".members")):  # members first: the clearest sign
        value, kind, count = plain[key], key.split(".", 1)[0], key.rsplit(".", 1)[-1]
        if kind not in {"stats", "consensus", "coxfit", "scaling"} or count not in {"members", "samples"}:
            continue
        values = np.asarray(value, dtype=np.float64).reshape(-1)
        if count == "members":
            whole = np.abs(values - np.round(values)) <= COUNT_TOLERANCE
            bad = ~(np.isfinite(values) & whole & (values > -COUNT_TOLERANCE) & (values < members + COUNT_TOLERANCE))
            allowed = f"a whole number from 0 to {members} (the consortium's members)"
        else:
            upper = np.inf if total is None else total + COUNT_TOLERANCE
            bad = ~(np.isfinite(values) & (values > -COUNT_TOLERANCE) & (values < upper))
            allowed = "0 or more" if total is None else f"0 to {total} (the samples the members' records published)"
        if bad.any():
            raise IntegrityError(
                f"{aggregate}: the opened aggregate is implausible: {key} holds {values[bad][0]:.6g} where it must "
                f"be {allowed}; it was opened with the wrong key or the file is damaged. Nothing was released"
            )


def published_samples(records: dict[str, list[dict]]) -> int | None:
    """The samples the sites' records say they hold (per site the largest count it published: its
    statistics samples or its split sizes); ``None`` when no record gives one."""
    total, found = 0, False
    for site_records in records.values():
        counts = []
        for record in site_records:
            if isinstance(record.get("statistics_samples"), int | float):
                counts.append(int(record["statistics_samples"]))
            sizes = record.get("samples")
            if isinstance(sizes, dict):
                counts.append(int(sum(v for v in sizes.values() if isinstance(v, int | float))))
        if counts:
            total, found = total + max(counts), True
    return total if found else None


def read_digests(folder: Path) -> list[dict[str, Any]]:
    """The lines of ``folder/digests.jsonl`` (a line being written is skipped); [] when there is none."""
    path = Path(folder) / DIGESTS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def round_digests(folder: Path) -> dict[int, dict[str, str]]:
    """Per round, what the server recorded as it completed (``aggregate_sha256``, ``published_sha256``), from
    the one ``digests.jsonl`` under ``folder``; {} when there is none."""
    found = sorted(Path(folder).rglob(DIGESTS_FILE)) if Path(folder).is_dir() else []
    if len(found) != 1:
        return {}
    return {
        int(entry["round"]): {key: entry[key] for key in ("aggregate_sha256", "published_sha256") if key in entry}
        for entry in read_digests(found[0].parent)
        if entry.get("kind") == KIND_ROUND and entry.get("round") is not None
    }


def verify_digests(run: Path) -> None:
    """The aggregate and ``published.jsonl`` of the job's run folder ``run`` must be the bytes the server
    recorded in its ``digests.jsonl``; a :class:`ResultsError` names the file that differs."""
    models = sorted(Path(run).rglob(GLOBAL_MODEL_FILE))
    aggregate = models[-1] if models else None
    digests = read_digests(run)
    where = Path(run) / DIGESTS_FILE
    if not digests:
        raise IntegrityError(
            f"{run}: no {DIGESTS_FILE}, the server's record of what it received, so nothing in this folder can be "
            "checked; give the job's folder as the server (or nvflare job download) left it, from a server "
            "of this version"
        )
    rounds = [d for d in digests if d.get("kind") == KIND_ROUND and d.get("aggregate_sha256")]
    if aggregate is not None:
        if not rounds:
            raise IntegrityError(f"{where}: records no stored aggregate, but {aggregate} exists")
        last = rounds[-1]
        found = file_digest(aggregate)
        if found["sha256"] != last["aggregate_sha256"]:
            raise IntegrityError(
                f"{aggregate}: its sha256 {found['sha256'][:16]}... is not the "
                f"{last['aggregate_sha256'][:16]}... the server recorded when it stored round {last.get('round')} "
                f"({where}): the aggregate was altered or comes from another job; download the job again"
            )
    published = [d for d in digests if d.get("published_sha256")]
    path = Path(run) / PUBLISHED_FILE
    if published:
        last = published[-1]
        found = file_digest(path) if path.is_file() else {"sha256": "(missing)", "bytes": 0}
        if found["sha256"] != last["published_sha256"]:
            raise IntegrityError(
                f"{path}: its sha256 {found['sha256'][:16]}... ({found['bytes']} bytes) is not the "
                f"{last['published_sha256'][:16]}... ({last.get('published_bytes')} bytes) the server recorded after "
                f"its last record ({where}): the records were edited or come from another job; download the job again"
            )


def open_statistics(
    plain: dict[str, np.ndarray], config: ConsortiumConfig, *, features: list[str]
) -> dict[str, EndpointStatistics]:
    """Each endpoint's released statistics from the opened aggregate (rows below ``min_members`` withheld)."""
    spec = DesignSpec(**settings.design_spec(config))
    cox = select(plain, "coxfit")
    details = {}
    for name, values in select(plain, "stats").items():
        detail = endpoint_statistics(
            values, spec=spec, feature_names=features, **settings.statistics_release(config, name)
        )
        if name in cox:
            detail.design["cox_fit"] = cox_convergence(cox[name])
        if detail.kind != "survival":
            detail.design["member_weights"] = config.statistics.member_weights
        details[name] = detail
    return details


def cox_convergence(summed: dict[str, np.ndarray]) -> dict[str, float | bool]:
    """How far the covariates' Cox fit of the last round was from its maximum: the Newton decrement
    ``U' I^-1 U / 2`` (the log partial likelihood still to gain), from the last round's summed pieces."""
    gradient = np.asarray(summed["gradient"], dtype=np.float64)
    q = gradient.size
    information = np.zeros((q, q))
    information[np.triu_indices(q)] = np.asarray(summed["information"], dtype=np.float64)
    information = information + np.triu(information, 1).T
    try:
        decrement = float(gradient @ np.linalg.solve(information, gradient)) / 2.0
    except np.linalg.LinAlgError:
        decrement = float("inf")
    return {"newton_decrement": decrement, "converged": bool(decrement < 1e-8)}
