"""``report.json`` and ``report.md`` of a run: the contract researchers and notebooks read.

Shape (see DESIGN.md)::

    {
      "consortium": str, "job_id": str, "env": "sim" | "poc", "created": ISO time,
      "members": {member: {"samples": int, "tasks": {task: {
          "type": str, "metric": str, "federated": float, "local": float?, "pooled": float?,
          "precision_at_k": {"federated": float, "local": float?, "pooled": float?}?}}}},
      "biomarkers": {"consensus": [{"feature", "score", "rank"}...],
                     "tasks": {task: [{"feature", "score", "rank"}...]},
                     "ground_truth": {task: [feature...]}?},
      "rounds": [{"round": int, "seconds": float, "bytes_sent": int, "sites": {member: {...}}}],
      "privacy": {"he": bool, "dp": bool, "epsilon_spent": {member: float}?, "delta": float?,
                  "shared": "trunk parameters only", ...},
      "timing": {"rounds": int, "seconds_total": float, "seconds_per_round": float,
                 "bytes_sent_per_round": int, "bytes_sent_per_round_per_member": {member: int}},
      "tracking": {"uri": str, "experiment": str, "model_run_id": str?}
    }
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.site_outputs import json_safe

TOP_N = 50


def ranking_records(table: pd.DataFrame, *, top: int = TOP_N) -> list[dict[str, Any]]:
    rows = table.sort_values("rank").head(top)
    return [{"feature": str(r.feature), "score": float(r.score), "rank": int(r.rank)} for r in rows.itertuples()]


def round_summary(metrics: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round: the slowest site's seconds, the bytes all sites sent, and each site's figures."""
    rounds: dict[int, dict[str, Any]] = {}
    for member, records in metrics.items():
        for record in records:
            entry = rounds.setdefault(
                record["round"], {"round": record["round"], "seconds": 0.0, "bytes_sent": 0, "sites": {}}
            )
            entry["seconds"] = max(entry["seconds"], float(record["seconds"]))
            entry["bytes_sent"] += int(record["bytes_sent"])
            entry["sites"][member] = {
                "train_loss": record["train_loss"],
                "bytes_sent": record["bytes_sent"],
                "val": record["val"],
                "test": record["test"],
                **({"epsilon": record["epsilon"]} if record.get("epsilon") is not None else {}),
            }
    return [rounds[k] for k in sorted(rounds)]


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically into ``out``."""
    json_path, md_path = out / "report.json", out / "report.md"
    texts = {json_path: json.dumps(json_safe(report), indent=2, allow_nan=False), md_path: render_markdown(report)}
    for path, text in texts.items():
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
    return json_path, md_path


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Federated run `{report['job_id']}` of {report['consortium']}", ""]
    timing, privacy = report["timing"], report["privacy"]
    lines += [
        f"- environment: {report['env']}; rounds: {timing['rounds']}; total {timing['seconds_total']:.1f} s "
        f"({timing['seconds_per_round']:.1f} s per round)",
        f"- bytes sent per round (all members): {timing['bytes_sent_per_round']:,}",
        f"- homomorphic encryption: {'on' if privacy['he'] else 'off'}; DP-SGD: {'on' if privacy['dp'] else 'off'}"
        + (f" (epsilon spent: {privacy.get('epsilon_spent')})" if privacy["dp"] else ""),
        "",
        "## Test metrics per member and task",
        "",
        "| member | task | metric | local only | federated | pooled | P@k local | P@k federated | P@k pooled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for member, info in report["members"].items():
        for task, t in info["tasks"].items():
            pk = t.get("precision_at_k", {})
            lines.append(
                f"| {member} | {task} | {t['metric']} | {_fmt(t.get('local'))} | {_fmt(t['federated'])} | "
                f"{_fmt(t.get('pooled'))} | {_fmt(pk.get('local'))} | {_fmt(pk.get('federated'))} | "
                f"{_fmt(pk.get('pooled'))} |"
            )
    lines += [""] + [f"- *{name}*: {text}" for name, text in report.get("definitions", {}).items()]
    lines += ["", "## Consensus biomarkers (top 20)", "", "| rank | feature | score | planted |", "|---|---|---|---|"]
    planted = {f for features in report["biomarkers"].get("ground_truth", {}).values() for f in features}
    for row in report["biomarkers"]["consensus"][:20]:
        mark = "yes" if row["feature"] in planted else ("no" if planted else "")
        lines.append(f"| {row['rank']} | {row['feature']} | {row['score']:.4f} | {mark} |")
    lines += ["", f"MLflow: `{report['tracking']['uri']}`, experiment `{report['tracking']['experiment']}`", ""]
    return "\n".join(lines)
