"""The released association statistics as people and tools read them: JSON records, per endpoint.

Used by ``report.json`` (``biomarkers``) and by ``consortium stats`` (``statistics.json``), so both say the
same: the table by p (limma's ``topTable`` columns, or the Cox score test's), the features up and down
with the endpoint, what was withheld and why, the design, and with ``statistics.by: region`` the effect
in every region with the interaction test and Cochran's Q. Every row carries the gene ``symbol`` beside
its ``feature`` id ('' where no member's file names one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from consortium.anndata_export import panel_symbols
from omics.layout import with_symbols
from omics.statistics import ADJ_P, EndpointStatistics
from schema.config import ConsortiumConfig


def records(table: pd.DataFrame | None, *, symbols: pd.Series | None = None) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts; NaN and inf become ``None``; with ``symbols`` (by feature id), a ``symbol``
    beside ``feature``."""
    if table is None or table.empty:
        return []
    if symbols is not None and "feature" in table:
        table = with_symbols(table, symbols)
    clean = table.replace([np.inf, -np.inf], np.nan)
    return clean.astype(object).where(clean.notna(), None).to_dict(orient="records")


def small_cell_members(published: Mapping[str, list[dict]]) -> dict[str, list[str]]:
    """Per endpoint, the members whose last record says they were below the small-cell rule for it."""
    below: dict[str, list[str]] = {}
    for member, rows in published.items():
        for endpoint in (rows[-1] if rows else {}).get("small_cell") or []:
            below.setdefault(str(endpoint), []).append(member)
    return {name: sorted(members) for name, members in below.items()}


def statistics_entries(
    config: ConsortiumConfig,
    details: Mapping[str, EndpointStatistics],
    *,
    published: Mapping[str, list[dict]],
    symbols: pd.Series | None = None,
) -> dict[str, dict[str, Any]]:
    """Per endpoint: the full table by p, markers up and down, and how the rows were released; gene symbols
    by feature from ``symbols``, by default those the members' files here give (:func:`panel_symbols`)."""
    endpoints = config.endpoints()
    symbols = panel_symbols(config) if symbols is None else symbols
    below = small_cell_members(published)
    entries = {}
    for name, detail in details.items():
        table = detail.table
        entries[name] = {
            "type": detail.kind,
            "members": list(endpoints[name]["members"]),
            "small_cell": below.get(name, []),
            "features_tested": int(len(table)),
            "withheld_min_members": int(detail.withheld),
            "significant_adj_p05": int((table[ADJ_P] < 0.05).sum()) if ADJ_P in table else 0,
            "design": dict(detail.design),
            "statistics": records(table, symbols=symbols),
            "markers": records(detail.markers(direction="up"), symbols=symbols),
            "markers_down": records(detail.markers(direction="down"), symbols=symbols),
        }
        if detail.regions is not None:
            entries[name]["regions"] = records(detail.regions, symbols=symbols)
    return entries


def data_residency(config: ConsortiumConfig, *, he: bool) -> list[dict[str, str]]:
    """For each member: where its data stayed and what crossed a border (the cross-border use case)."""
    crossed = (
        "encrypted (CKKS) model updates and summed statistics; the operator adds ciphertexts it cannot read"
        if he
        else "model updates and statistics under pairwise masks: the operator reads only their sum"
        if config.secure_aggregation()
        else "model updates and statistics in plaintext: the operator reads each member's pieces as they arrive"
    )
    return [
        {
            "member": m.name,
            "region": m.region or "not declared",
            "data": f"stayed at {m.name}" + (f" ({m.region})" if m.region else ""),
            "crossed": crossed,
        }
        for m in config.members
    ]
