"""A run's biomarker results as an AnnData file (``results.h5ad``) a scanpy user opens directly.

Layout (scanpy's conventions: per-feature results in ``.var``, tool outputs and their parameters in ``.uns``):

- ``var``: the consortium panel, in panel order; ``gene_symbols`` where a member's file names them; per
  endpoint ``<endpoint>_statistic``, ``_effect``, ``_pvalue``, ``_qvalue``, ``_members`` (federated association
  statistics) and ``<endpoint>_model_score``, ``_model_rank`` (signed model attribution, its rank);
- ``obs``: one row per endpoint (type, holders, shared), ``X`` its association statistic per feature, with
  the effect, p-value, q-value and model score as ``layers`` (NaN where a feature has no value);
- ``uns['rank_genes_groups_<endpoint>']``: the statistics in the layout of scanpy's ``rank_genes_groups``
  (``sc.get.rank_genes_groups_df(adata, group=endpoint, key='rank_genes_groups_<endpoint>')``);
- ``uns['parameters']``: the consortium's settings (no member file paths), ``uns['run']``: the run's figures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from omics.errors import OmicsError
from omics.io import write_member
from omics.layout import SYMBOLS, MemberLayout, read_symbols
from omics.statistics import rank_genes_groups_record, uniform_columns
from schema import settings
from schema.config import ConsortiumConfig
from schema.writes import writing

log = logging.getLogger(__name__)

RESULTS_FILE = "results.h5ad"
STATISTICS = ("statistic", "effect", "pvalue", "qvalue", "members")
_RUN_KEYS = ("consortium", "job_id", "job_ids", "env", "folds", "created", "privacy", "timing", "dropped")


def panel_symbols(config: ConsortiumConfig) -> pd.Series:
    """Gene symbols of the panel features, from the var of every member file readable here (first wins).

    A file that is absent here (another member's site) or names no symbols is skipped: symbols are for
    display only. With a panel of gene symbols, a feature without another symbol shows its own name.
    """
    found = pd.Series(dtype=str, name=SYMBOLS)
    for member in config.members:
        if not Path(member.data).is_file():
            continue
        try:
            symbols = read_symbols(member.data, layout=MemberLayout(**settings.member_layout(config, member.name)))
        except (OSError, KeyError, OmicsError) as exc:
            log.info("no gene symbols from %s: %s", member.data, exc)
            continue
        found = pd.concat([found, symbols[~symbols.index.isin(found.index)]])
    panel = config.panel_features()
    if config.panel.id_kind == "symbol":  # the identifiers are the symbols
        found = pd.concat([found, pd.Series(panel, index=panel)[~pd.Index(panel).isin(found.index)]])
    return found.reindex(panel).dropna()


def results_anndata(
    released,
    *,
    config: ConsortiumConfig,
    report: Mapping[str, Any] | None = None,
    symbols: pd.Series | None = None,
) -> ad.AnnData:
    """The AnnData of a run's released results (see the module docstring).

    Parameters
    ----------
    released
        :class:`consortium.results.Released`: per endpoint its statistics table and model ranking.
    report
        The run's report (``build_report``); its run figures go to ``uns['run']``.
    symbols
        Gene symbols by panel feature; default: :func:`panel_symbols`.
    """
    panel = pd.Index(config.model_features(), dtype=str)  # the omics panel, then the clinical inputs
    endpoints = config.endpoints()
    names = [n for n in endpoints if n in released.statistics or n in released.rankings]
    var = pd.DataFrame(index=panel)
    symbols = panel_symbols(config) if symbols is None else symbols
    var[SYMBOLS] = pd.Series(symbols, dtype=object).reindex(panel).fillna("").astype(str).to_numpy()
    planes = {key: np.full((len(names), len(panel)), np.nan) for key in ("statistic", *STATISTICS[1:4], "model")}
    uns: dict[str, Any] = {}
    for row, name in enumerate(names):
        table = released.statistics.get(name)
        if table is not None:
            by_feature = table.set_index("feature").reindex(panel)
            source = {**uniform_columns(endpoints[name]["type"]), "members": "members"}
            for column in STATISTICS:
                var[f"{name}_{column}"] = by_feature[source[column]].to_numpy(dtype=np.float64)
            for key in ("statistic", "effect", "pvalue", "qvalue"):
                planes[key][row] = by_feature[source[key]].to_numpy(dtype=np.float64)
            uns[f"rank_genes_groups_{name}"] = rank_genes_groups_record(table, group=name, kind=endpoints[name]["type"])
        ranking = released.rankings.get(name)
        if ranking is not None:
            by_feature = ranking.set_index("feature").reindex(panel)
            direction = by_feature.get("direction", 1.0)
            signed = (by_feature["score"] * direction).to_numpy(dtype=np.float64)
            var[f"{name}_model_score"] = signed
            if "rank" in by_feature:
                var[f"{name}_model_rank"] = by_feature["rank"].to_numpy(dtype=np.float64)
            planes["model"][row] = signed
    obs = pd.DataFrame(
        {
            "type": [endpoints[n]["type"] for n in names],
            "members": [",".join(endpoints[n]["members"]) for n in names],
            "shared": [len(endpoints[n]["members"]) > 1 for n in names],
        },
        index=pd.Index(names, dtype=str),
    )
    adata = ad.AnnData(
        X=planes.pop("statistic").astype(np.float32),
        obs=obs,
        var=var,
        layers={key: values.astype(np.float32) for key, values in planes.items()},
    )
    adata.uns.update(uns)
    adata.uns["parameters"] = _h5_safe(_parameters(config))
    if report is not None:
        adata.uns["run"] = _h5_safe({k: report[k] for k in _RUN_KEYS if k in report})
    return adata


def write_results_anndata(
    released,
    *,
    config: ConsortiumConfig,
    out: Path,
    report: Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`results_anndata` to ``out`` (a folder: ``out/results.h5ad``; or an ``.h5ad`` path),
    atomically. Returns the path written."""
    out = Path(out)
    path = out if out.suffix == ".h5ad" else out / RESULTS_FILE
    adata = results_anndata(released, config=config, report=report)
    with writing(path) as temp:  # a full disk named in words, as for every file of the run
        write_member(adata, temp)
    log.info("wrote %s: %d endpoints x %d features", path, adata.n_obs, adata.n_vars)
    return path


def _parameters(config: ConsortiumConfig) -> dict[str, Any]:
    """The consortium's settings, without the member file paths (each member's own business)."""
    raw = config.model_dump(mode="json", exclude={"source"})
    for member in raw["members"]:
        member.pop("data", None)
    raw["panel"].pop("file", None)
    raw["panel"].pop("features", None)  # the panel is var_names
    return raw


def _h5_safe(value: Any) -> Any:
    """``value`` in the types h5ad stores in ``uns``: dicts of str keys, scalars, homogeneous arrays;
    ``None`` left out, lists of mappings or mixed lists as JSON text."""
    if isinstance(value, Mapping):
        return {str(k): _h5_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        if not value:
            return np.array([], dtype=str)
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=str)
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return np.array(value, dtype=np.float64)
        return json.dumps(value)
    return value
