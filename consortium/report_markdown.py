"""``report.md``: the report as a researcher reads it, with every figure's interval, every gain and every
loss beyond the paired interval, and genes by their symbols.

The formatting helpers here (:func:`fmt`, :func:`with_ci`, :func:`feature_label`, :func:`verdict`) are the
ones the console summary (:mod:`consortium.run_summary`) uses too, so both say the same.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

ARM_NAMES = {
    "federated": "federated",
    "local": "local only",
    "pooled": "pooled",
    "linear_local": "linear local",
    "linear_pooled": "linear pooled",
}
COMPARED = ("local", "pooled", "linear_local", "linear_pooled")
"""The arms the federated one is compared with (``difference['federated-<arm>']``)."""
DIRECTIONS = {
    "binary": ("higher in the positive class", "lower in the positive class"),
    "regression": ("higher with a larger target", "lower with a larger target"),
    "survival": ("higher with a higher risk", "lower with a higher risk"),
}
SHOWN = 10


def fmt(value: Any, *, digits: int = 3) -> str:
    """A figure to ``digits`` decimals; ``n/a`` for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def with_ci(value: Any, ci: Any, *, digits: int = 3, sign: bool = False) -> str:
    """``value [low, high]``; the value alone without an interval, ``n/a`` without a value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    shown = f"{value:+.{digits}f}" if sign else fmt(value, digits=digits)
    if not ci or ci[0] is None:
        return shown
    return f"{shown} [{fmt(ci[0], digits=digits)}, {fmt(ci[1], digits=digits)}]"


def verdict(diff: Mapping[str, Any] | None) -> str:
    """``gain`` or ``loss`` where the paired interval lies wholly above or below 0, else ``no difference shown``."""
    if not diff:
        return ""
    if diff.get("gain"):
        return "gain"
    if diff.get("loss") or (diff.get("ci") and diff["ci"][1] is not None and diff["ci"][1] < 0):
        return "loss"
    return "no difference shown"


def feature_label(row: Mapping[str, Any]) -> str:
    """How a person reads a feature: its gene symbol where one is known, else its id."""
    return str(row.get("symbol") or row["feature"])


def differences(report: Mapping[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """Every paired difference of the report: ``(where, endpoint, arm, difference)``, ``where`` a member's
    name or ``"within members"`` for a shared endpoint's figure."""
    for member, info in report["members"].items():
        for task, entry in info["tasks"].items():
            for arm in COMPARED:
                diff = (entry.get("difference") or {}).get(f"federated-{arm}")
                if diff:
                    yield member, task, arm, diff
    for name, entry in report["endpoints"].items():
        for arm in COMPARED:
            diff = (entry.get("difference") or {}).get(f"federated-{arm}")
            if diff and entry.get("shared"):
                yield "within members", name, arm, diff


def render_markdown(report: dict[str, Any]) -> str:
    timing, privacy = report["timing"], report["privacy"]
    folds = f"; {report['folds']}-fold cross-validation" if report.get("folds") else ""
    lines = [
        f"# Federated run `{report['job_id']}` of {report['consortium']}",
        "",
        f"- environment: {report['env']}; rounds: {timing['rounds']}{folds}; total {timing['seconds_total']:.1f} s",
        f"- bytes the server received per round (all members): {timing['bytes_received_per_round']:,}",
        f"- homomorphic encryption: {'on' if privacy['he'] else 'off'}; DP-SGD: {'on' if privacy['dp'] else 'off'}",
        *_secure_aggregation(privacy),
        *([f"- released model and biomarker tables: {report['release']['source']}"] if report.get("release") else []),
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
    ]
    lines += _member_tables(report)
    lines += _calibration_table(report)
    lines += _endpoint_table(report)
    lines += _gains_and_losses(report)
    lines += _seeds(report)
    lines += _biomarkers(report)
    residency = report.get("data_residency") or []
    if residency:
        lines += ["", "## Where the data stayed", "", "| member | region | data | what crossed a border |"]
        lines += ["|---|---|---|---|"]
        lines += [f"| {r['member']} | {r['region']} | {r['data']} | {r['crossed']} |" for r in residency]
    lines += [""] + [f"- *{name}*: {text}" for name, text in report.get("definitions", {}).items()]
    lines += ["", f"MLflow: `{report['tracking']['uri']}`, experiment `{report['tracking']['experiment']}`", ""]
    return "\n".join(lines)


WIDTH = 80
"""report.md's privacy lines are wrapped at this width (list items, continued with two spaces)."""


def _item(text: str) -> list[str]:
    """A list item wrapped at :data:`WIDTH`, its continuation lines indented."""
    return textwrap.wrap(text, width=WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


def _secure_aggregation(privacy: Mapping[str, Any]) -> list[str]:
    """Secure aggregation: on (how) or off (why), the threat model, what the aggregate reveals, quantization."""
    state = privacy.get("secure_aggregation")
    if not state:
        return []  # a report written before secure aggregation existed
    if state["enabled"]:
        lines = _item(f"- secure aggregation: on. {state['threat_model']}")
    else:
        lines = _item(f"- secure aggregation: off, {state.get('why_off') or 'not configured'}. {state['threat_model']}")
    lines += _item(f"- what the aggregate itself reveals: {state['aggregate_reveals']}")
    quantization = state.get("quantization")
    if quantization:
        lines += _item(
            f"- quantization: {quantization['fraction_bits']} fractional bits; a summed value is within "
            f"{quantization['error_bound_sum']:.2g} of the exact sum ({quantization['members']} members); "
            f"each member's values stay below {quantization['value_limit']:.2g} in absolute value"
        )
    return lines


def _arms(entries: list[Mapping[str, Any]]) -> list[str]:
    """The arms any of ``entries`` has a figure for, federated first."""
    return [a for a in ARM_NAMES if a == "federated" or any(e.get(a) is not None for e in entries)]


def _member_tables(report: Mapping[str, Any]) -> list[str]:
    entries = [t for info in report["members"].values() for t in info["tasks"].values()]
    arms = _arms(entries)
    compared = [a for a in COMPARED if any(f"federated-{a}" in (e.get("difference") or {}) for e in entries)]
    lines = [
        "",
        "## Test metric per member and endpoint (95% bootstrap intervals)",
        "",
        "| member | endpoint | metric | test samples | " + " | ".join(ARM_NAMES[a] for a in arms) + " |",
        "|---|---|---|---|" + "---|" * len(arms),
    ]
    for member, info in report["members"].items():
        for task, t in info["tasks"].items():
            ci = t.get("ci") or {}
            cells = [with_ci(t.get(a), ci.get(a)) for a in arms]
            lines.append(f"| {member} | {task} | {t['metric']} | {t.get('n_test') or ''} | {' | '.join(cells)} |")
    if compared:
        lines += [
            "",
            "## Federated against each arm (paired differences, 95% intervals)",
            "",
            "| member | endpoint | " + " | ".join(f"federated - {ARM_NAMES[a]}" for a in compared) + " |",
            "|---|---|" + "---|" * len(compared),
        ]
        for member, info in report["members"].items():
            for task, t in info["tasks"].items():
                diff = t.get("difference") or {}
                lines.append(
                    f"| {member} | {task} | " + " | ".join(_diff(diff.get(f"federated-{a}")) for a in compared) + " |"
                )
    return lines


CALIBRATION = ("brier", "calibration_slope", "calibration_in_the_large")


def _calibration_table(report: Mapping[str, Any]) -> list[str]:
    """The federated model's calibration on each member's test split, for its binary endpoints."""
    rows = []
    for member, info in report["members"].items():
        for task, t in info["tasks"].items():
            figures = (t.get("other_metrics") or {}).get("federated") or {}
            if any(k in figures for k in CALIBRATION):
                rows.append(f"| {member} | {task} | " + " | ".join(fmt(figures.get(k)) for k in CALIBRATION) + " |")
    if not rows:
        return []
    return [
        "",
        "## Calibration of the federated model's probabilities (binary endpoints, test split)",
        "",
        "Brier score (lower is better); calibration slope (1: calibrated, below 1: too extreme); observed minus "
        "predicted event rate (0: right on average).",
        "",
        "| member | endpoint | Brier | calibration slope | observed - predicted rate |",
        "|---|---|---|---|---|",
        *rows,
    ]


def _endpoint_table(report: Mapping[str, Any]) -> list[str]:
    rows = [(n, e) for n, e in report["endpoints"].items() if e.get("federated") is not None]
    if not rows:
        return []
    arms = _arms([e for _, e in rows])
    lines = [
        "",
        "## Endpoints within members (95% intervals, resampled within members)",
        "",
        "| endpoint | members | metric | " + " | ".join(ARM_NAMES[a] for a in arms) + " | federated - pooled |",
        "|---|---|---|" + "---|" * (len(arms) + 1),
    ]
    pooled_samples, left_out = [], []
    for name, e in rows:
        ci = e.get("ci") or {}
        cells = [with_ci(e.get(a), ci.get(a)) for a in arms]
        diff = _diff((e.get("difference") or {}).get("federated-pooled"))
        lines.append(f"| {name} | {', '.join(e['members'])} | {e['metric']} | {' | '.join(cells)} | {diff} |")
        if e.get("members_left_out"):
            left_out.append(
                f"- {name}: {', '.join(e['members_left_out'])} (one class or a constant target in the test split)"
            )
        if e.get("pooled_samples"):
            shown = ", ".join(f"{ARM_NAMES[a]} {fmt(v)}" for a, v in e["pooled_samples"].items() if a in ARM_NAMES)
            pooled_samples.append(f"- {name}: {shown}")
    if left_out:
        lines += ["", "Members left out of a within-member figure (their metric is undefined):", "", *left_out]
    if pooled_samples:
        lines += [
            "",
            "Pooled-sample figures (all holders' test samples together; differences between members alone raise "
            "them, so they are not a measure of the model):",
            "",
            *pooled_samples,
        ]
    return lines


def _gains_and_losses(report: Mapping[str, Any]) -> list[str]:
    """Per comparison: how many gains and losses beyond the paired interval, then each one with its numbers."""
    found = list(differences(report))
    if not found:
        return []
    lines = [
        "",
        "## Gains and losses beyond the paired interval",
        "",
        "| comparison | member endpoints compared | federated higher (gain) | federated lower (loss) |",
        "|---|---|---|---|",
    ]
    for arm in COMPARED:
        these = [d for where, _, a, d in found if a == arm and where in report["members"]]
        if these:
            gains = sum(verdict(d) == "gain" for d in these)
            losses = sum(verdict(d) == "loss" for d in these)
            lines.append(f"| federated - {ARM_NAMES[arm]} | {len(these)} | {gains} | {losses} |")
    for word, title in (("loss", "Losses: federated below"), ("gain", "Gains: federated above")):
        cases = [(w, e, a, d) for w, e, a, d in found if verdict(d) == word]
        lines += ["", f"{title} another arm beyond the paired interval:" if cases else f"{title} no other arm."]
        lines += [
            f"- {w} {e}: federated - {ARM_NAMES[a]} {with_ci(d['estimate'], d['ci'], sign=True)}"
            for w, e, a, d in cases
        ]
    per_comparison = max(sum(a == arm and w in report["members"] for w, _, a, _ in found) for arm in COMPARED)
    lines.append(
        f"\nWith {per_comparison} member endpoints per comparison and no multiplicity correction, about "
        f"{0.025 * per_comparison:.2f} gains and as many losses per comparison are expected by chance alone "
        "(each side of a 95% interval is 2.5%)."
    )
    if any(a == "pooled" and verdict(d) == "gain" for _, _, a, d in found):
        lines.append(
            "Where pooled falls below federated: the pooled arm trains one network for every member's endpoints "
            "with the same number of passes, while each federated member ends on its own heads."
        )
    return lines


def _seeds(report: Mapping[str, Any]) -> list[str]:
    seeds = report.get("seeds")
    if not seeds:
        return []
    lines = [
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
    return lines


def _biomarkers(report: Mapping[str, Any]) -> list[str]:
    """Per endpoint: the features higher with it and, apart, those lower (by statistic, scanpy's order), and
    the model's top features; by gene symbol where one is known."""
    lines = ["", "## Biomarkers per endpoint", ""]
    bio = report["biomarkers"]
    for name, endpoint in report["endpoints"].items():
        up_words, down_words = DIRECTIONS.get(endpoint.get("type", ""), ("up with the endpoint", "down with it"))
        up = [feature_label(r) for r in bio.get("markers", {}).get(name, [])[:SHOWN]]
        down = [feature_label(r) for r in bio.get("markers_down", {}).get(name, [])[:SHOWN]]
        model = [feature_label(r) for r in bio["model"].get(name, [])[:SHOWN]]
        if name not in bio["statistics"] and not model:
            continue
        lines.append(f"- **{name}**")
        if name in bio["statistics"]:
            lines += [
                f"  statistics, {up_words} (top {SHOWN} by statistic): {', '.join(up) or 'none'}",
                f"  statistics, {down_words}: {', '.join(down) or 'none'}",
            ]
        if model:
            lines.append(f"  model (top {SHOWN}): {', '.join(model)}")
        release = bio.get("statistics_release", {}).get(name)
        if release:
            lines.append(f"  {_release_line(release)}")
    return lines


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


def _diff(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return ""
    return f"{with_ci(entry.get('estimate'), entry.get('ci'), sign=True)} ({verdict(entry)})"
