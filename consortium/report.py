"""``report.json`` and ``report.md`` of a run, built from what the operator's server received.

Shape: :class:`schema.report.Report` (validated before it is written). Figures a site published come
from ``published.jsonl``; statistics and model rankings from the released aggregate; the benchmark
comparison (local, pooled and linear arms, paired intervals) only when the run was asked for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from consortium import comparison
from consortium.anndata_export import panel_symbols
from consortium.report_markdown import render_markdown
from consortium.report_privacy import privacy
from consortium.statistics_release import data_residency, statistics_entries
from jobs.published import json_safe
from models.attribution import precision_at_k
from models.metrics import METRICS, primary_metric
from omics.layout import with_symbols
from schema.config import ConsortiumConfig
from schema.report import Report
from schema.writes import atomic_write, writing

if TYPE_CHECKING:
    from consortium.run_results import FinishedJob

TOP_N = 50
TOP_K_OVERLAP = 20
DEFINITIONS = {
    "federated": (
        "each member's model after the last round: the shared trunk and shared heads it trained from the "
        "last aggregate, with its private heads; scored once on its own test split (out of fold with --folds)"
    ),
    "local": "the same network trained on the member's data alone, the same number of passes, no selection",
    "pooled": "one network on all members' data together (one head per endpoint), the same passes, no selection",
    "linear_local / linear_pooled": (
        "penalized logistic / ridge / Cox (scikit-learn, scikit-survival), penalty chosen on the validation split; "
        "for an endpoint only one member holds, linear_pooled is linear_local (no one else has its labels)"
    ),
    "budget": "every network arm gets rounds x local_epochs passes over its training data; none selects an epoch",
    "ci": "95% percentile bootstrap over the test samples (within members for endpoint figures); 1000 resamples",
    "gain / loss": (
        "federated minus another arm, paired bootstrap: a gain where the whole interval is above 0, a loss where "
        "it is below 0, else no difference shown"
    ),
    "endpoint figures": (
        "a shared endpoint's figure within members: AUROC and R2 are each holder's own on its test split, "
        "averaged with weights by its labelled test samples (intervals resampled within members); the C-index "
        "counts pairs within a member only. pooled_samples: AUROC or R2 over all holders' test samples together, "
        "which differences between members alone raise; kept for reference, not a measure of the model"
    ),
    "spearman_r / other_metrics": (
        "a regression endpoint's Spearman rank correlation per arm, within each member and averaged with weights by "
        "its labelled test samples (no interval); other_metrics: a member's other test figures of the federated model "
        "(binary: AUPRC, Brier score, calibration slope, observed minus predicted event rate)"
    ),
    "symbol": "the gene symbol a member's file gives for the feature (var['gene_symbols']); '' where none is known",
    "statistics": (
        "per endpoint and feature, member as a factor: limma's linear model with the declared design and "
        "eBayes moderated t (binary: logFC; regression: slope), Cox score test given the covariates stratified "
        "by member with Efron ties (survival); Benjamini-Hochberg adj.P.Val; a shared endpoint's row needs "
        "statistics.min_members contributors"
    ),
    "model": "integrated gradients (Captum): class contrast (binary) or risk direction, summed over holders",
}


def build_report(
    config: ConsortiumConfig,
    outcomes: Sequence[FinishedJob],
    *,
    env: str,
    he: bool,
    seconds: float,
    arms: comparison.ArmPredictions | None,
    tracking_uri: str,
    folds: int | None,
) -> dict[str, Any]:
    """The report of a run: one or (with folds) several jobs, their releases and the comparison."""
    last_outcome, last_results, released = outcomes[-1].outcome, outcomes[-1].results, outcomes[-1].opened
    endpoints = config.endpoints()
    kinds = {name: info["type"] for name, info in endpoints.items()}
    truth = _ground_truth(config)
    members = _members(config, last_results.records)
    biomarkers = _biomarkers(config, released, truth=truth, published=last_results.records)
    for info in members.values():
        for task, entry in info["tasks"].items():
            if truth and task in truth and task in released.rankings:
                entry["precision_at_k"] = {"federated": precision_at_k(released.rankings[task], truth[task])}
    report: dict[str, Any] = {
        "consortium": config.name,
        "job_id": last_outcome.job_id,
        "job_ids": [job.job_id for job in outcomes],
        "env": env,
        "folds": folds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": members,
        "endpoints": {
            name: {
                "type": info["type"],
                "metric": primary_metric(info["type"]),
                "members": info["members"],
                "shared": len(info["members"]) > 1,
                **({"time_unit": info["time_unit"]} if "time_unit" in info else {}),
            }
            for name, info in endpoints.items()
        },
        "definitions": DEFINITIONS,
        "biomarkers": biomarkers,
        "rounds": _rounds(last_results.records),
        "dropped": last_results.dropped([m.name for m in config.members], _total_rounds(last_results.records)),
        "rejoined": last_results.rejoined([m.name for m in config.members], _total_rounds(last_results.records)),
        "privacy": privacy(config, he=he, records=last_results.records),
        "data_residency": data_residency(config, he=he),
        "timing": _timing(last_results.records, seconds=seconds, rounds=_total_rounds(last_results.records)),
        "tracking": {"uri": tracking_uri, "experiment": config.tracking.experiment},
    }
    if arms is not None:
        _add_comparison(report, arms, kinds=kinds, endpoints=endpoints, seed=config.training.seed)
    return report


def _total_rounds(records: Mapping[str, list[dict]]) -> int:
    return max((int(r[-1].get("total_rounds") or len(r)) for r in records.values() if r), default=0)


def _members(config: ConsortiumConfig, records: Mapping[str, list[dict]]) -> dict[str, Any]:
    members = {}
    for member in config.members:
        final = (records.get(member.name) or [{}])[-1]
        if "test" not in final:
            final = {}  # the member dropped out before the last round: no final figures from it
        tasks = {}
        for task in member.tasks:
            metric = primary_metric(task.type)
            figures = (final.get("test") or {}).get(task.name, {})
            tasks[task.name] = {
                "type": task.type,
                "metric": metric,
                "federated": figures.get(metric),
                "ci": {"federated": figures.get("ci")},
                "n_test": figures.get("n"),
            }
            # the member's other figures on its test split (AUPRC, calibration, Pearson, Spearman), federated model
            others = {k: figures[k] for k in METRICS[task.type] if k != metric and k in figures}
            if others:
                tasks[task.name]["other_metrics"] = {"federated": others}
        members[member.name] = {"samples": final.get("samples"), "tasks": tasks}
    return members


def _biomarkers(config: ConsortiumConfig, released, *, truth: dict | None, published) -> dict[str, Any]:
    symbols = panel_symbols(config)  # every record: the id in "feature", the gene symbol beside it
    entries = statistics_entries(config, released.details, published=published, symbols=symbols)
    statistics = {name: entry.pop("statistics") for name, entry in entries.items()}
    # scanpy's rank_genes_groups convention: the features higher in the positive class (higher risk, larger
    # target) first, by statistic; what a biologist calls the endpoint's markers; and apart, those lower
    markers = {name: entry.pop("markers") for name, entry in entries.items()}
    markers_down = {name: entry.pop("markers_down") for name, entry in entries.items()}
    model = {
        name: _records(with_symbols(table, symbols), ["feature", "symbol", "score", "direction", "frequency", "rank"])
        for name, table in released.rankings.items()
    }
    both = {}
    for name in set(released.statistics) & set(released.rankings):
        top_stats = set(released.statistics[name]["feature"].head(TOP_K_OVERLAP))
        top_model = set(released.rankings[name].sort_values("rank")["feature"].head(TOP_K_OVERLAP))
        both[name] = sorted(top_stats & top_model)
    out: dict[str, Any] = {
        "statistics": statistics,
        "markers": markers,
        "markers_down": markers_down,
        "statistics_release": entries,
        "model": model,
        f"both_top{TOP_K_OVERLAP}": both,
        "consensus": _consensus(released.rankings, symbols=symbols),
    }
    if truth:
        out["ground_truth"] = truth
        planted = {f for features in truth.values() for f in features}
        top = [row["feature"] for row in out["consensus"][: len(planted)]]
        out["consensus_planted_in_top"] = {"k": len(planted), "planted": sum(f in planted for f in top)}
    return out


def _consensus(rankings: Mapping[str, pd.DataFrame], *, symbols: pd.Series) -> list[dict[str, Any]]:
    """All endpoints together: mean over endpoints of each feature's normalized |score|."""
    if not rankings:
        return []
    columns = []
    for table in rankings.values():
        scores = table.set_index("feature")["score"].abs().astype(float)
        total = scores.sum()
        columns.append(scores / total if total > 0 else scores * 0.0)
    combined = pd.concat(columns, axis=1).fillna(0.0).mean(axis=1).sort_values(ascending=False, kind="mergesort")
    return [
        {"feature": str(f), "symbol": str(symbols.get(str(f), "")), "score": float(s), "rank": i + 1}
        for i, (f, s) in enumerate(combined.head(TOP_N).items())
    ]


def _records(table: pd.DataFrame, columns: list[str], *, top: int = TOP_N) -> list[dict[str, Any]]:
    rows = table.head(top) if "rank" not in table else table.sort_values("rank").head(top)
    return json_safe(rows.loc[:, [c for c in columns if c in rows]].to_dict(orient="records"))


def _rounds(records: Mapping[str, list[dict]]) -> list[dict[str, Any]]:
    rounds: dict[int, dict[str, Any]] = {}
    for site, site_records in records.items():
        for record in site_records:
            entry = rounds.setdefault(
                int(record["round"]), {"round": int(record["round"]), "seconds": 0.0, "bytes_received": 0, "sites": {}}
            )
            entry["seconds"] = max(entry["seconds"], float(record.get("seconds") or 0.0))
            entry["bytes_received"] += int(record.get("bytes_received") or 0)
            entry["sites"][site] = {
                k: record.get(k) for k in ("train_loss", "val", "steps", "bytes_received", "epsilon")
            }
    return [rounds[k] for k in sorted(rounds)]


def _timing(records: Mapping[str, list[dict]], *, seconds: float, rounds: int) -> dict[str, Any]:
    per_member = {s: int(np.mean([r.get("bytes_received") or 0 for r in recs])) for s, recs in records.items() if recs}
    return {
        "rounds": rounds,
        "seconds_total": seconds,
        "seconds_per_round": seconds / max(rounds, 1),
        "bytes_received_per_round": int(sum(per_member.values())),
        "bytes_received_per_round_per_member": per_member,
    }


def _add_comparison(report, arms, *, kinds, endpoints, seed) -> None:
    figures = comparison.member_figures(arms, kinds=kinds, seed=seed)
    for member, tasks in figures.items():
        for task, values in tasks.items():
            entry = report["members"][member]["tasks"][task]
            for arm in comparison.ARMS:
                if arm in values:
                    entry[arm] = values[arm]
            entry["ci"] = values["ci"]
            entry["difference"] = values["difference"]
            entry["n_test"] = values.get("n")
    holders = {name: [m for m in info["members"] if m in arms.targets] for name, info in endpoints.items()}
    holders = {name: members for name, members in holders.items() if members}
    for name, values in comparison.endpoint_figures(arms, kinds=kinds, holders=holders, seed=seed).items():
        report["endpoints"][name].update({k: v for k, v in values.items() if k not in ("type", "metric", "members")})
    report["summary"] = summarize(report)


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """Per comparison (federated against each other arm): the member endpoints compared and how many paired
    gains and losses the intervals support; per member, each metric's mean over its endpoints by arm (an
    AUROC is never averaged with an R2 or a C-index)."""
    paired = {f"federated-{arm}": {"compared": 0, "gains": 0, "losses": 0} for arm in comparison.COMPARED}
    per_member: dict[str, dict[str, dict[str, float]]] = {}
    for name, info in report["members"].items():
        rows = [t for t in info["tasks"].values() if t.get("local") is not None and t.get("federated") is not None]
        for t in rows:
            for key, diff in (t.get("difference") or {}).items():
                if key in paired:
                    paired[key]["compared"] += 1
                    paired[key]["gains"] += bool(diff.get("gain"))
                    paired[key]["losses"] += bool(diff.get("loss"))
        for metric in sorted({t["metric"] for t in rows}):
            same = [t for t in rows if t["metric"] == metric]
            per_member.setdefault(name, {})[metric] = {
                arm: float(np.mean(values)) if values else math.nan
                for arm in comparison.ARMS
                for values in [[t[arm] for t in same if isinstance(t.get(arm), float) and math.isfinite(t[arm])]]
            }
    return {"per_member": per_member, "paired": paired}


def _ground_truth(config: ConsortiumConfig) -> dict[str, list[str]] | None:
    path = config.source.parent / "ground_truth.json" if config.source else None
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text()).get("tasks")


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Validate and write ``report.json`` and ``report.md`` atomically into ``out``."""
    safe = json_safe(report)
    Report.model_validate(safe)
    json_path, md_path = out / "report.json", out / "report.md"
    texts = {json_path: json.dumps(safe, indent=2, allow_nan=False), md_path: render_markdown(safe)}
    for path, text in texts.items():
        atomic_write(path, text)
    return json_path, md_path


def write_biomarker_tables(released, folder: Path, *, config: ConsortiumConfig | None = None) -> list[Path]:
    """Full tables, one CSV per endpoint: ``statistics_<endpoint>.csv`` and ``model_<endpoint>.csv``; with
    ``config``, a ``symbol`` column beside ``feature`` (:func:`consortium.anndata_export.panel_symbols`)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = panel_symbols(config) if config is not None else None
    written = []
    for prefix, tables in (("statistics", released.statistics), ("model", released.rankings)):
        for name, table in tables.items():
            path = folder / f"{prefix}_{name}.csv"
            shown = with_symbols(table, symbols) if symbols is not None else table
            with writing(path) as temp:
                shown.to_csv(temp, index=False)
            written.append(path)
    return written
