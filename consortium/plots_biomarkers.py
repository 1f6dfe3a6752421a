"""The biomarker plots: association statistics (volcano), effects by region (forest) and the model's top
features with their direction. Features are shown by gene symbol where the report has one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from adjustText import adjust_text
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from consortium.plots_common import display_names, grid, in_endpoint_order, legend_below, message, symbols
from omics.statistics import EFFECT, uniform_columns

UP, DOWN, FLAT = "tab:red", "tab:blue", "lightgray"
HIGHER = {"binary": "higher in the positive class", "regression": "higher with the target", "survival": "higher risk"}


def statistics_tables(report: Mapping[str, Any], run_dir: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Each endpoint's association statistics: the full table from ``<run>/biomarkers/`` when given and
    present, else the top features ``report.json`` keeps."""
    tables = {}
    for name, rows in report["biomarkers"]["statistics"].items():
        kept = pd.DataFrame(rows)
        path = Path(run_dir) / "biomarkers" / f"statistics_{name}.csv" if run_dir is not None else None
        full = pd.read_csv(path) if path is not None and path.exists() else None
        # the report keeps the table's head: a table that does not start with it is another run's
        head = [] if full is None else list(full["feature"].astype(str).head(len(kept)))
        same_run = full is not None and head == [r["feature"] for r in rows]
        tables[name] = full if same_run else kept
    return tables


def _direction_legend(kinds: set[str], *, label: str) -> list:
    """Red and blue patches saying what up and down mean for the endpoint kinds shown."""
    up = " / ".join(HIGHER[k] for k in sorted(kinds))
    return [Patch(color=UP, label=f"{up}{label}"), Patch(color=DOWN, label=f"the opposite{label}")]


def volcano(
    report: Mapping[str, Any],
    *,
    statistics: Mapping[str, pd.DataFrame] | None = None,
    q_threshold: float = 0.05,
    label_top: int = 8,
) -> Figure:
    """Effect against -log10 p per endpoint; q below the threshold in colour, planted features ringed, the
    ``label_top`` smallest p labelled by symbol (placed by adjustText: inside the axes, not overlapping)."""
    tables = dict(statistics) if statistics is not None else statistics_tables(report)
    tables = in_endpoint_order(report, {name: table for name, table in tables.items() if len(table)})
    if not tables:
        return message("no association statistics in this report")
    planted = report["biomarkers"].get("ground_truth") or {}
    known = symbols(report)
    fig, axes = grid(len(tables), size=(4.2, 3.6))
    kinds, any_planted, labels = set(), False, []
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        kind = report["endpoints"].get(name, {}).get("type", "binary")
        kinds.add(kind)
        table = table.rename(columns={v: k for k, v in uniform_columns(kind).items()}).reset_index(drop=True)
        effect = table["effect"].to_numpy(float)
        height = -np.log10(table["pvalue"].clip(lower=1e-300).to_numpy(float))
        hit = table["qvalue"].to_numpy(float) < q_threshold
        colors = np.where(hit, np.where(effect > 0, UP, DOWN), FLAT)
        ax.scatter(effect, height, s=8, c=colors, linewidths=0)
        truth = table["feature"].isin(planted.get(name, [])).to_numpy()
        if truth.any():
            any_planted = True
            ax.scatter(effect[truth], height[truth], s=30, facecolors="none", edgecolors="black", lw=0.7)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set(title=f"{name} ({kind}), {len(table)} features", xlabel=EFFECT[kind], ylabel="-log10 p")
        ax.set_ylim(0, max(1.0, np.nanmax(height)) * 1.15)  # headroom for the top labels
        top = np.argsort(table["pvalue"].to_numpy(float), kind="stable")[:label_top]
        names = display_names(table.iloc[top], known)
        texts = [ax.text(effect[i], height[i], label, fontsize=7) for i, label in zip(top, names, strict=True)]
        shown = hit | np.isin(np.arange(len(table)), top)  # the labels keep off the coloured points
        labels.append((ax, texts, effect[shown], height[shown]))
    label = f", q < {q_threshold:g}"
    handles = [
        *_direction_legend(kinds, label=label),
        Patch(color=FLAT, label=f"q ≥ {q_threshold:g}"),
    ]
    if any_planted:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="black", label="planted (synthetic data)"))
    legend_below(fig, handles)
    fig.canvas.draw()  # the final layout first: the labels are placed in display space
    fig.set_layout_engine("none")  # and kept: labels inside the axes change no margin, and adjustText redraws
    for ax, texts, x, y in labels:
        if texts:
            arrows = {"arrowstyle": "-", "color": "gray", "lw": 0.5}
            adjust_text(texts, x=x, y=y, ax=ax, ensure_inside_axes=True, time_lim=1, arrowprops=arrows)
    return fig


def region_forest(report: Mapping[str, Any], *, top: int = 6) -> Figure:
    """Per endpoint analysed by region, the top features' effect in every region with its 95% interval,
    and the interaction p and I² beside each feature (``statistics.by: region``)."""
    entries = in_endpoint_order(
        report,
        {
            name: entry
            for name, entry in report["biomarkers"].get("statistics_release", {}).items()
            if entry.get("regions")
        },
    )
    if not entries:
        return message("no subgroups by region in this report (statistics.by: region)")
    known = symbols(report)
    fig, axes = grid(len(entries), ncols=2, size=(6.0, 0.55 * top * 2 + 1.5))
    for ax, (name, entry) in zip(axes, entries.items(), strict=True):
        records = report["biomarkers"]["statistics"].get(name, [])[:top]
        head = [row["feature"] for row in records]
        shown = dict(zip(head, display_names(pd.DataFrame(records), known), strict=True)) if records else {}
        rows = pd.DataFrame(entry["regions"])
        rows = rows[rows["feature"].isin(head)]
        regions = list(dict.fromkeys(rows["region"]))
        stats = {r["feature"]: r for r in records}
        height = len(regions) + 1
        ticks, labels = [], []
        for i, feature in enumerate(head):
            for j, region in enumerate(regions):
                match = rows[(rows["feature"] == feature) & (rows["region"] == region)]
                if match.empty:
                    continue
                row = match.iloc[0]
                y = -(i * height + j)
                ax.errorbar(
                    [row["effect"]],
                    [y],
                    xerr=[[row["effect"] - row["ci_low"]], [row["ci_high"] - row["effect"]]],
                    fmt="o",
                    ms=4,
                    color=f"C{j}",
                    label=region,
                )
            info = stats.get(feature, {})
            ticks.append(-(i * height + (len(regions) - 1) / 2))
            labels.append(
                f"{shown[feature]}\np(int) {_fmt_p(info.get('interaction_p'))}, I² {_fmt_pct(info.get('I2'))}"
            )
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_yticks(ticks, labels=labels, fontsize=8)
        kind = report["endpoints"].get(name, {}).get("type", "binary")
        ax.set(title=f"{name}: effect by region (95% CI)", xlabel=EFFECT.get(kind, "effect"))
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    legend_below(fig, list(handles.values()), title="region")
    return fig


def _fmt_p(value) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _fmt_pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def effect_directions(report: Mapping[str, Any], *, top: int = 10) -> Figure:
    """Per endpoint, the model's top features by attribution, signed by their direction (up: red)."""
    model = report["biomarkers"].get("model", {})
    rankings = in_endpoint_order(report, {name: pd.DataFrame(rows) for name, rows in model.items() if rows})
    if not rankings:
        return message("no model rankings in this report")
    known = symbols(report)
    fig, axes = grid(len(rankings), size=(4.2, 0.3 * top + 1.3))
    kinds = set()
    for ax, (name, table) in zip(axes, rankings.items(), strict=True):
        kinds.add(report["endpoints"].get(name, {}).get("type", "binary"))
        head = table.sort_values("rank").head(top).iloc[::-1].reset_index(drop=True)
        signed = (head["score"] * head.get("direction", 1)).to_numpy(float)
        positions = np.arange(len(head))
        ax.barh(positions, signed, color=np.where(signed > 0, UP, DOWN))
        ax.set_yticks(positions, labels=list(display_names(head, known)), fontsize=9)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set(title=f"{name}: model's top {len(head)}", xlabel="attribution × direction")
    legend_below(fig, _direction_legend(kinds, label=""))
    return fig
