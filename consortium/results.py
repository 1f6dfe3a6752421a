"""What the operator's server received in a job, read back from the job's folder, and its release.

A job's folder (the simulator's workspace, a POC result, or what ``nvflare job download`` fetched from
provisioned kits) holds, somewhere under the server's run folder:

- ``published.jsonl``: one record per site and round, as :class:`jobs.published.PublishedResultsRecorder`
  wrote it (validation figures each round; test figures with intervals in the last);
- ``FL_global_model.sections``: the last aggregate: trunk, shared heads, the summed association
  statistics and attribution vectors; plaintext, or ciphertext that only a member's secret context opens.

:func:`release` opens the aggregate (decrypting it with a member's context under HE) and turns it into
the shared model's state, each endpoint's association table and each endpoint's consensus ranking.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobs.he.context import context_from_bytes
from jobs.he.payload import decrypt_update
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
        context = context_from_bytes(data, source=str(client_context)[:200], private=True)
        summed = decrypt_update(context, stored.encrypted)
    else:
        summed = stored.params
    plain = finalize(summed, stored.meta)
    features = config.panel_features()
    details = open_statistics(plain, config, features=features)
    statistics = {name: detail.table for name, detail in details.items()}
    rankings = {}
    for name, values in select(plain, "consensus").items():
        members = np.maximum(np.round(values["members"]), 1.0)
        rankings[name] = ranking_from_vector(
            features, values["score"] / members, frequency=values["frequency"] / members
        )
    state = {k: v for k, v in plain.items() if k.startswith((TRUNK_PREFIX, HEAD_PREFIX))}
    return Released(state=state, statistics=statistics, rankings=rankings, details=details)


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
