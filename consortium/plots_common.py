"""What the report's plots share: the panel grid, the message figure, legends outside the data and the
names a person reads (gene symbols where the report has them, else the panel identifiers)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRIC_NAMES = {"auroc": "AUROC", "r2": "R²", "c_index": "C-index"}


def grid(panels: int, *, ncols: int = 3, size: tuple[float, float] = (4.0, 3.4)) -> tuple[Figure, list]:
    """A figure with exactly ``panels`` axes (unused grid cells removed), drawn by Agg (no pyplot)."""
    ncols = max(1, min(ncols, panels))
    nrows = max(1, math.ceil(panels / ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer for the label placement, which measures text before the figure is saved
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for extra in axes[panels:]:
        fig.delaxes(extra)
    return fig, axes[:panels]


def message(text: str) -> Figure:
    """A figure holding a sentence and no axes: what a plot says when the report has nothing for it."""
    fig = Figure(figsize=(5, 1.5))
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def is_message(fig: Figure) -> bool:
    """True for a :func:`message` figure (nothing plotted)."""
    return not fig.axes


def legend_below(fig: Figure, handles: Sequence[Artist], *, title: str | None = None) -> None:
    """One legend for the whole figure, under its panels (constrained layout makes room for it), in as
    many columns as fit the figure's width."""
    for ncols in range(min(len(handles), 5), 0, -1):
        legend = fig.legend(
            handles=list(handles),
            loc="outside lower center",
            ncols=ncols,
            fontsize=8,
            title=title,
            title_fontsize=8,
            frameon=False,
        )
        if ncols == 1 or legend.get_window_extent(fig.canvas.get_renderer()).width <= 0.98 * fig.bbox.width:
            return
        legend.remove()


def in_endpoint_order(report: Mapping[str, Any], by_endpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``by_endpoint`` with its keys in the report's (config) order of endpoints; any other key last."""
    order = {name: i for i, name in enumerate(report.get("endpoints", {}))}
    return dict(sorted(by_endpoint.items(), key=lambda item: order.get(item[0], len(order))))


def symbols(report: Mapping[str, Any]) -> dict[str, str]:
    """Feature id -> gene symbol from every record of ``report["biomarkers"]`` that names both."""
    found: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            symbol, feature = node.get("symbol"), node.get("feature")
            if isinstance(symbol, str) and symbol and isinstance(feature, str):
                found.setdefault(feature, symbol)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report.get("biomarkers", {}))
    return found


def display_names(table: pd.DataFrame, known: Mapping[str, str]) -> pd.Series:
    """Per row of a table with a ``feature`` column: its ``symbol`` column where set, else the symbol the
    report knows for the feature, else the feature id."""
    features = table["feature"].astype(str)
    names = features.map(lambda f: known.get(f, f))
    if "symbol" in table.columns:
        own = table["symbol"]
        given = own.notna() & own.astype(str).str.strip().ne("")
        names = names.where(~given, own.astype(str))
    return names
