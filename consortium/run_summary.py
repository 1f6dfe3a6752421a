"""The console summary of a run's result: the test metrics with their intervals, every gain and every loss
beyond the paired interval, the features higher and lower with each endpoint, and where the report is.

It says what ``report.md`` says (the same helpers, :mod:`consortium.report_markdown`), in a layout that fits
80 columns: a heading line per member and endpoint (full names; a line that is not cut) above a small table
of the arms, so no column has to hold a long endpoint name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from consortium.console import Console
from consortium.report_markdown import (
    ARM_NAMES,
    COMPARED,
    DIRECTIONS,
    differences,
    feature_label,
    fmt,
    verdict,
    with_ci,
)

if TYPE_CHECKING:
    from consortium.run_results import RunResult

console = Console()
SHOWN = 8


def print_summary(result: RunResult, *, to: Console | None = None) -> None:
    """The run's result on the console (``to``, by default this module's: stdout)."""
    render_summary(result.report, report_path=result.report_path, markdown_path=result.markdown_path, to=to or console)


def render_summary(report: Mapping[str, Any], *, report_path: Path, markdown_path: Path, to: Console) -> None:
    """Print the summary of ``report`` (a run's ``report.json``) on ``to``."""

    def say(text: str, **options: Any) -> None:
        to.print(text, markup=False, highlight=False, **options)

    _metrics(report, to=to, say=say)
    _gains_and_losses(report, say=say)
    for member, round_ in (report.get("dropped") or {}).items():
        back = (report.get("rejoined") or {}).get(member)
        again = f", answered again from round {back}" if back is not None else ""
        say(f"{member} dropped out in round {round_}{again}; the run went on without it", style="yellow")
    for key, parts in (report.get("continued") or {}).items():
        chain = " then ".join(f"{p['job_id']} (rounds {p['rounds'][0]}-{p['rounds'][1]})" for p in parts)
        say(f"job {key} was interrupted and continued: {chain}")
    _biomarkers(report, say=say)
    timing = report["timing"]
    say(
        f"{timing['rounds']} rounds in {timing['seconds_total']:.0f} s, "
        f"{timing['bytes_received_per_round']:,} bytes received per round; HE "
        f"{'on' if report['privacy']['he'] else 'off'}, masks {'on' if _masked(report) else 'off'}"
    )
    jobs = report.get("job_ids") or ([report["job_id"]] if report.get("job_id") else [])
    if jobs:
        say(f"FLARE job{'s' if len(jobs) > 1 else ''}: {', '.join(jobs)}")
    say(f"report: {report_path}")
    say(f"markdown: {markdown_path}")
    uri = str(report["tracking"]["uri"])
    if uri.startswith(("http://", "https://")):  # a tracking server: its own web UI
        say(f"MLflow: {uri}")
    else:
        say(f"MLflow: mlflow ui --backend-store-uri {uri}")


def _metrics(report: Mapping[str, Any], *, to: Console, say) -> None:
    entries = [(m, task, t) for m, info in report["members"].items() for task, t in info["tasks"].items()]
    compared = any(t.get("difference") for _, _, t in entries)
    if not compared:  # the federated arm alone: one small table
        table = _table(("member", "endpoint", "metric", "federated", "95% interval"))
        for member, task, t in entries:
            ci = (t.get("ci") or {}).get("federated") or [None, None]
            table.add_row(member, task, t["metric"], fmt(t.get("federated")), _interval(ci))
        say("test metric per member and endpoint, 95% bootstrap interval")
        to.print(table)
        return
    say("test metric per member and endpoint, 95% bootstrap intervals; federated minus each arm, paired")
    for member, task, t in entries:
        say(f"{member} {task}: {t['metric']} on {t.get('n_test') or '?'} test samples", style="bold")
        to.print(_arms_table(t))
    for name, e in report["endpoints"].items():
        if e.get("shared") and e.get("federated") is not None:
            pooled = e.get("pooled_samples") or {}
            note = (
                f"; over all holders' samples pooled (differences between members raise it): "
                f"federated {fmt(pooled['federated'])}"
                if "federated" in pooled
                else ""
            )
            say(f"{name} within members ({', '.join(e['members'])}): {e['metric']}{note}", style="bold")
            to.print(_arms_table(e))


def _arms_table(entry: Mapping[str, Any]) -> Table:
    """One member endpoint (or a shared endpoint within members): each arm's figure, its interval, and
    federated minus it with the paired interval and the verdict."""
    table = _table(("arm", entry["metric"], "95% interval", "federated - arm", ""), indent=True)
    ci, diffs = entry.get("ci") or {}, entry.get("difference") or {}
    for arm, name in ARM_NAMES.items():
        if entry.get(arm) is None:
            continue
        diff = diffs.get(f"federated-{arm}")
        shown = f"{diff['estimate']:+.3f} {_interval(diff['ci'])}" if diff else ""
        word = verdict(diff)
        table.add_row(
            name, fmt(entry[arm]), _interval(ci.get(arm)), shown, "none shown" if word.startswith("no ") else word
        )
    return table


def _table(columns: tuple[str, ...], *, indent: bool = False) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=indent, padding=(0, 1))
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _interval(ci: Any) -> str:
    if not ci or ci[0] is None:
        return ""
    return f"[{fmt(ci[0], digits=2)}, {fmt(ci[1], digits=2)}]"


def _gains_and_losses(report: Mapping[str, Any], *, say) -> None:
    """Per comparison, the gains and the losses beyond the paired interval; then each loss and each gain."""
    found = list(differences(report))
    if not found:
        return
    counts = []
    for arm in COMPARED:
        these = [d for where, _, a, d in found if a == arm and where in report["members"]]
        if these:
            gains = sum(verdict(d) == "gain" for d in these)
            losses = sum(verdict(d) == "loss" for d in these)
            counts.append(f"vs {ARM_NAMES[arm]}: {_count(gains, 'gain')}, {_count(losses, 'loss')} of {len(these)}")
    say("member endpoints beyond the paired interval, federated " + "; ".join(counts))
    for word, relation in (("loss", "below"), ("gain", "above")):
        for where, endpoint, arm, diff in found:
            if verdict(diff) == word:
                say(
                    f"{word}: {where} {endpoint}: federated {relation} {ARM_NAMES[arm]}, "
                    f"{with_ci(diff['estimate'], diff['ci'], sign=True)}",
                    style="red" if word == "loss" else "green",
                )


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _biomarkers(report: Mapping[str, Any], *, say) -> None:
    """Per endpoint: the features higher with it, apart those lower (scanpy's order), and the model's top."""
    bio = report["biomarkers"]
    for name, endpoint in report["endpoints"].items():
        up_words, down_words = DIRECTIONS.get(endpoint.get("type", ""), ("up with it", "down with it"))
        up = ", ".join(feature_label(r) for r in bio.get("markers", {}).get(name, [])[:SHOWN]) or "none"
        down = ", ".join(feature_label(r) for r in bio.get("markers_down", {}).get(name, [])[:SHOWN]) or "none"
        model = ", ".join(feature_label(r) for r in bio["model"].get(name, [])[:SHOWN]) or "n/a"
        if name in bio.get("statistics", {}):
            say(f"{name}: statistics, {up_words}: {up}")
            say(f"{name}: statistics, {down_words}: {down}")
        if bio["model"].get(name):
            say(f"{name}: model: {model}")
    planted = bio.get("consensus_planted_in_top")
    if planted:
        say(f"{planted['planted']} of the top {planted['k']} consensus biomarkers were planted")


def _masked(report: dict) -> bool:
    """Whether the run's members masked what they sent (``privacy.secure_aggregation``; absent in older reports)."""
    return bool((report["privacy"].get("secure_aggregation") or {}).get("enabled"))
