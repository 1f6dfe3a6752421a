"""``report.md``: the report as a researcher reads it, with every figure's interval."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _with_ci(value: Any, ci: Any) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def render_markdown(report: dict[str, Any]) -> str:
    timing, privacy = report["timing"], report["privacy"]
    folds = f"; {report['folds']}-fold cross-validation" if report.get("folds") else ""
    lines = [
        f"# Federated run `{report['job_id']}` of {report['consortium']}",
        "",
        f"- environment: {report['env']}; rounds: {timing['rounds']}{folds}; total {timing['seconds_total']:.1f} s",
        f"- bytes the server received per round (all members): {timing['bytes_received_per_round']:,}",
        f"- homomorphic encryption: {'on' if privacy['he'] else 'off'}; DP-SGD: {'on' if privacy['dp'] else 'off'}",
        "",
        *[
            f"- **{m} dropped out in round {r}**: "
            + (
                f"no update from it until round {report['rejoined'][m]}, when it answered again"
                if m in (report.get("rejoined") or {})
                else "no update from it from then on"
            )
            + "; the run went on with the others"
            for m, r in (report.get("dropped") or {}).items()
        ],
        *[
            f"- job {key} was interrupted and continued: "
            + " then ".join(f"`{p['job_id']}` (rounds {p['rounds'][0]}-{p['rounds'][1]})" for p in parts)
            for key, parts in (report.get("continued") or {}).items()
        ],
        "",
        "## Test metric per member and endpoint (95% bootstrap intervals)",
        "",
        "| member | endpoint | metric | federated | local only | pooled | linear pooled | federated - local "
        "| federated - pooled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for member, info in report["members"].items():
        for task, t in info["tasks"].items():
            ci, diff = t.get("ci") or {}, t.get("difference") or {}
            lines.append(
                f"| {member} | {task} | {t['metric']} | {_with_ci(t.get('federated'), ci.get('federated'))} | "
                f"{_with_ci(t.get('local'), ci.get('local'))} | {_with_ci(t.get('pooled'), ci.get('pooled'))} | "
                f"{_with_ci(t.get('linear_pooled'), ci.get('linear_pooled'))} | {_diff(diff.get('federated-local'))} | "
                f"{_diff(diff.get('federated-pooled'))} |"
            )
    endpoint_rows = [(n, e) for n, e in report["endpoints"].items() if e.get("federated") is not None]
    if endpoint_rows:
        lines += [
            "",
            "## Endpoints over all holding members' test samples",
            "",
            "| endpoint | members | metric | federated | local | pooled | linear pooled | federated - pooled |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, e in endpoint_rows:
            ci = e.get("ci") or {}
            lines.append(
                f"| {name} | {', '.join(e['members'])} | {e['metric']} | "
                f"{_with_ci(e.get('federated'), ci.get('federated'))} | "
                f"{_with_ci(e.get('local'), ci.get('local'))} | {_with_ci(e.get('pooled'), ci.get('pooled'))} | "
                f"{_with_ci(e.get('linear_pooled'), ci.get('linear_pooled'))} | "
                f"{_diff((e.get('difference') or {}).get('federated-pooled'))} |"
            )
    gains = (report.get("summary") or {}).get("paired_gains")
    if gains:
        lines += [
            "",
            f"Paired gains (interval above 0): federated over local in {gains['federated-local']} of "
            f"{gains['tasks']} member endpoints, over pooled in {gains['federated-pooled']}.",
        ]
        lines += _pooled_below_federated(report, gains["tasks"])
    seeds = report.get("seeds")
    if seeds:
        lines += [
            "",
            f"## Paired differences over {seeds['n']} seeds (mean +- sd)",
            "",
            "| member | endpoint | federated - local | federated - pooled |",
            "|---|---|---|---|",
        ]
        for member, tasks in seeds["paired_differences"].items():
            for task, diffs in tasks.items():
                cells = [diffs.get(k) for k in ("federated-local", "federated-pooled")]
                shown = [f"{c['mean']:+.3f} +- {c['sd']:.3f}" if c else "" for c in cells]
                lines.append(f"| {member} | {task} | {shown[0]} | {shown[1]} |")
    lines += ["", "## Biomarkers per endpoint", ""]
    bio = report["biomarkers"]
    for name in report["endpoints"]:
        up = [r["feature"] for r in bio.get("markers", {}).get(name, [])[:10]]
        down = [r["feature"] for r in bio.get("markers_down", {}).get(name, [])[:10]]
        model = [r["feature"] for r in bio["model"].get(name, [])[:10]]
        lines += [
            f"- **{name}** statistics, up with the endpoint (top 10 by statistic): {', '.join(up) or 'none'}",
            f"  down with it: {', '.join(down) or 'none'}",
            f"  model (top 10): {', '.join(model) or 'n/a'}",
        ]
        release = bio.get("statistics_release", {}).get(name)
        if release:
            lines.append(f"  {_release_line(release)}")
    residency = report.get("data_residency") or []
    if residency:
        lines += ["", "## Where the data stayed", "", "| member | region | data | what crossed a border |"]
        lines += ["|---|---|---|---|"]
        lines += [f"| {r['member']} | {r['region']} | {r['data']} | {r['crossed']} |" for r in residency]
    lines += [""] + [f"- *{name}*: {text}" for name, text in report.get("definitions", {}).items()]
    lines += ["", f"MLflow: `{report['tracking']['uri']}`, experiment `{report['tracking']['experiment']}`", ""]
    return "\n".join(lines)


def _release_line(release: dict[str, Any]) -> str:
    """How an endpoint's statistics were released: design, tested, withheld, small cells, Cox convergence."""
    design = release.get("design", {})
    parts = [f"design `{design.get('formula')}` + member", f"{release.get('features_tested', 0)} features tested"]
    parts.append(f"{release.get('significant_adj_p05', 0)} with adj.P.Val < 0.05")
    if release.get("withheld_min_members"):
        parts.append(f"{release['withheld_min_members']} withheld (fewer than {design.get('min_members')} members)")
    if release.get("small_cell"):
        parts.append(f"below the small-cell rule, sent nothing: {', '.join(release['small_cell'])}")
    cox = design.get("cox_fit")
    if cox is not None and not cox.get("converged"):
        parts.append(f"Cox fit of the covariates not converged (Newton decrement {cox.get('newton_decrement'):.2g})")
    return "; ".join(parts)


def _diff(entry: dict | None) -> str:
    if not entry:
        return ""
    verdict = "gain" if entry.get("gain") else "no gain shown"
    return f"{_with_ci(entry.get('estimate'), entry.get('ci'))} ({verdict})"


def _pooled_below_federated(report: dict[str, Any], compared: int) -> list[str]:
    """Where pooled falls below federated beyond the paired interval, say so with the numbers, and how
    many such cases chance alone gives (each one-sided 2.5%, no multiplicity correction)."""
    cases = [
        (member, task, t["difference"]["federated-pooled"])
        for member, info in report["members"].items()
        for task, t in info["tasks"].items()
        if (t.get("difference") or {}).get("federated-pooled", {}).get("gain")
    ]
    if not cases:
        return []
    lines = ["", "Pooled below federated beyond the paired interval:"]
    for member, task, diff in cases:
        lines.append(f"- {member} {task}: federated - pooled {_with_ci(diff['estimate'], diff['ci'])}")
    lines.append(
        f"With {compared} member endpoints compared and no multiplicity correction, about {0.025 * compared:.2f} "
        "such cases are expected by chance alone; the pooled arm also trains one network for every member's "
        "endpoints with the same number of passes, while each federated member ends on its own heads."
    )
    return lines
