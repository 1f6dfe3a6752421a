"""What ``consortium feasibility`` shows of ``feasibility.json``: a console table (80 columns), ``report.md``,
a funnel plot and an enrollment-curve plot. Everything here reads the released document only, so it
shows nothing the release rules withheld.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from consortium.plots_common import grid, legend_below, message
from models.enrollment import enrollment_curve, site_rates
from schema.writes import atomic_write, writing

log = logging.getLogger(__name__)

WIDTH = 80
LABEL = 40
SECTIONS = (("funnel", "Attrition funnel (patients left)"), ("relaxation", "Relaxation gain (if dropped alone)"))
STRATA = "Eligible patients by stratum"


def _columns(document: dict) -> list[str]:
    """``total``, then the members whose columns fit in 80 characters beside the label."""
    members = sorted((document["cells"][0].get("members") or {}) if document["cells"] else {})
    room = (WIDTH - LABEL - 9) // 9
    return ["total", *members[:room]]


def _value(row: dict, column: str) -> Any:
    return row["total"] if column == "total" else row["members"][column]


def _sections(document: dict) -> list[tuple[str, list[dict]]]:
    cells = document["cells"]
    found = [(title, [r for r in cells if r["section"] == name]) for name, title in SECTIONS]
    found.append((STRATA, [r for r in cells if r["section"] == "stratum"]))
    return [(title, rows) for title, rows in found if rows]


def table_lines(document: dict) -> list[str]:
    """The released counts as lines of at most 80 characters (labels cut to fit)."""
    columns = _columns(document)
    header = f"{'':<{LABEL}}" + "".join(f"{c[:8]:>9}" for c in columns)
    lines = [f"protocol {document['protocol']}: released counts", header]
    for title, rows in _sections(document):
        lines.append(title)
        for row in rows:
            label = row["label"] if len(row["label"]) <= LABEL - 2 else row["label"][: LABEL - 5] + "..."
            lines.append(f"  {label:<{LABEL - 2}}" + "".join(f"{_value(row, c)!s:>9}" for c in columns))
    enrollment = document.get("enrollment")
    if enrollment:
        lines.append(f"Months to {_target(enrollment)} patients (median, {_interval(enrollment)} interval)")
        for row in enrollment["scenarios"]:
            lines.append(f"  {row['scenario'][: LABEL - 2]:<{LABEL - 2}} {_months(row)}")
    return [line[:WIDTH] for line in lines]


def _target(enrollment: dict) -> Any:
    return enrollment["scenarios"][0]["target"] if enrollment["scenarios"] else "?"


def _interval(enrollment: dict) -> str:
    return f"{enrollment['scenarios'][0]['interval']:.0%}" if enrollment["scenarios"] else ""


def _months(row: dict) -> str:
    if row["median"] is None:
        return "never (no site enrolls)"
    high = "inf" if row["high"] is None else f"{row['high']:.1f}"
    return f"{row['median']:.1f} ({row['low']:.1f} to {high})"


def report_markdown(document: dict) -> str:
    """``report.md``: the release rule, the funnel, the relaxation gains, the strata and the scenarios."""
    members = sorted((document["cells"][0].get("members") or {}) if document["cells"] else {})
    columns = ["total", *members]
    lines = [
        f"# Protocol feasibility: {document['protocol']}",
        "",
        f"Consortium {document.get('consortium', '')}, job {document.get('job_id', '')} "
        f"({document.get('env', '')}, HE {'on: only the total is released' if document.get('he') else 'off'}).",
        "",
        document["release_rule"],
        "",
    ]
    for title, rows in _sections(document):
        lines += [f"## {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += ["| " + row["label"] + " | " + " | ".join(str(_value(row, c)) for c in columns) + " |" for row in rows]
        lines.append("")
    enrollment = document.get("enrollment")
    if enrollment:
        lines += [
            "## Enrollment scenarios",
            "",
            f"{enrollment['model']}; consent rate {enrollment['consent_rate']:g}, rate CV {enrollment['rate_cv']:g}, "
            f"screening capacity a month {enrollment['screening_capacity']}. A scenario resting on a withheld "
            "count is not forecast.",
            "",
            f"| scenario | eligible share | months to {_target(enrollment)} "
            f"(median, {_interval(enrollment)} interval) |",
            "|---|---|---|",
        ]
        for row in enrollment["scenarios"]:
            share = enrollment["eligible_fractions"].get(row["scenario"])
            lines.append(f"| {row['scenario']} | {share:.3f} | {_months(row)} |")
        lines.append("")
    return "\n".join(lines)


def write_report(document: dict, folder: Path) -> Path:
    return atomic_write(Path(folder) / "report.md", report_markdown(document))


def funnel_figure(document: dict):
    """Patients left after each criterion (the total; a withheld or small cell is marked, not drawn)."""
    rows = [r for r in document["cells"] if r["section"] == "funnel"]
    fig, (ax,) = grid(1, ncols=1, size=(7.0, 0.45 * len(rows) + 1.5))
    values = [r["total"] if isinstance(r["total"], int) else 0 for r in rows]
    positions = np.arange(len(rows))[::-1]
    bars = ax.barh(positions, values, color="tab:blue", label="patients left (total)")
    for position, row, value in zip(positions, rows, values, strict=True):
        ax.text(value, position, f" {row['total']}", va="center", fontsize=8)
    ax.set_yticks(positions, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel("patients")
    ax.set_title(f"Attrition funnel: {document['protocol']}", fontsize=10)
    ax.margins(x=0.15)
    legend_below(fig, [bars])
    return fig


def enrollment_figure(document: dict):
    """Patients enrolled by month under the protocol (median and interval band) and the target."""
    enrollment = document.get("enrollment")
    if not enrollment or not enrollment["scenarios"]:
        return message("No enrollment forecast: give feasibility.screening_capacity and feasibility.target.")
    target = _target(enrollment)
    fig, (ax,) = grid(1, ncols=1, size=(7.0, 4.0))
    handles = []
    horizon = max((r["high"] or r["median"] or 0) for r in enrollment["scenarios"] if r["median"] is not None)
    months = np.linspace(0.0, max(horizon, 1.0) * 1.1, 40)
    shown = [r for r in enrollment["scenarios"] if r["median"] is not None][:4]
    for index, row in enumerate(shown):
        fraction = enrollment["eligible_fractions"][row["scenario"]]
        rates = site_rates(enrollment["screening_capacity"], fraction, consent_rate=enrollment["consent_rate"])
        curve = enrollment_curve(list(rates.values()), months, rate_cv=enrollment["rate_cv"])
        color = f"C{index}"
        (line,) = ax.plot(months, curve[:, 1], color=color, label=f"{row['scenario']} (median)")
        ax.fill_between(months, curve[:, 0], curve[:, 2], color=color, alpha=0.15)
        handles.append(line)
    handles.append(ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}"))
    ax.set_xlabel("months")
    ax.set_ylabel("patients enrolled")
    ax.set_title("Enrollment (Poisson-gamma; bands: 5-95%)", fontsize=10)
    legend_below(fig, handles)
    return fig


def write_plots(document: dict, folder: Path, *, dpi: int = 110) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, figure in (("funnel", funnel_figure(document)), ("enrollment", enrollment_figure(document))):
        path = folder / f"{stem}.png"
        with writing(path) as temp:
            figure.savefig(temp, dpi=dpi)
        written.append(path)
    log.info("wrote %d feasibility plots to %s", len(written), folder)
    return written
