"""Each endpoint's federated association statistics: what a member sends, and the table whoever holds the
sum computes from it.

The analysis a biostatistician runs on pooled data, made exact from sums:

- ``binary`` and ``regression``: limma. Every feature's linear model ``feature ~ design + member``, the
  design declared once in ``consortium.yaml`` (``endpoint`` plus covariates), member as a factor; then
  empirical-Bayes moderated t (``eBayes``, with ``trend`` and ``robust`` as limma has them). The endpoint's
  coefficient is the effect: the log fold change of a binary endpoint (log scale of the expression), the
  slope of a regression endpoint. See :mod:`omics.linear_model`.
- ``survival``: a Cox model of the covariates stratified by member, fitted by Newton steps over summed
  gradients and informations (one exchange a step), then each feature's score test given that fit, Efron
  ties. See :mod:`omics.cox`.

A member below the small-cell rule (fewer than ``min_cell`` samples in a class, labelled samples, or
events; samples, not cells, for a pseudobulked member) sends nothing for that endpoint:
:func:`site_statistics` returns ``None``. A released row needs ``min_members`` contributors; rows below it
are withheld and counted (:func:`endpoint_statistics`).

Every array sent is float64 and 1-D (2-D pieces flattened), so the server adds them as they come,
plaintext or CKKS ciphertexts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import false_discovery_control
from scipy.stats import t as student_t

from omics.chunked import is_chunked
from omics.contrasts import cochran_q, contrast_effects, f_test
from omics.cox import CoxStep, cox_score_table, newton_step, site_cox_fit_pieces, site_cox_score_pieces
from omics.cox_regions import cox_region_tables, region_slots
from omics.design import DesignSpec, design_matrix
from omics.ebayes import ebayes
from omics.linear_model import (
    LINEAR_KEYS,
    fit_linear_models,
    member_variance_factor,
    site_linear_statistics,
    top_table,
)

log = logging.getLogger(__name__)

_COLUMN_BLOCK = 2048  # features whose detection counts are taken at a time (no samples x features mask)
_NONZERO_BLOCK = 2**22  # a CSR matrix's stored values whose detection is counted at a time

Kind = Literal["binary", "regression", "survival"]
ENDPOINT = "endpoint"
P_VALUE, ADJ_P = "P.Value", "adj.P.Val"
EFFECT = {"binary": "logFC", "regression": "logFC", "survival": "logHR"}
STATISTIC = {"binary": "t", "regression": "t", "survival": "statistic"}
METHODS = {
    "binary": "limma: lmFit(feature ~ endpoint + covariates + member), eBayes moderated t",
    "regression": "limma: lmFit(feature ~ endpoint + covariates + member), eBayes moderated t",
    "survival": "Cox score test given the covariates, stratified by member, Efron ties",
}
REGION_TAG = "region["


LOW_DETECTION_RULE = "detected in fewer samples than the smaller class holds (edgeR filterByExpr's min.group)"


def uniform_columns(kind: Kind) -> dict[str, str]:
    """The table's column behind each of the uniform names ``statistic, effect, pvalue, qvalue`` (plots and
    ``results.h5ad`` read every kind through them)."""
    return {"statistic": STATISTIC[kind], "effect": EFFECT[kind], "pvalue": P_VALUE, "qvalue": ADJ_P}


@dataclass(frozen=True)
class EndpointDesign:
    """What a member needs to build its pieces of one endpoint: the declared design and the rules."""

    spec: DesignSpec
    min_cell: int = 5
    region: str | None = None
    detection: bool = False  # count data: send per-feature detection counts for the low-detection filter


def design_columns(spec: DesignSpec, *, kind: Kind) -> list[str]:
    """The design's column names (the same at every member), built from the declaration alone."""
    row = {name: [0.0] for name in spec.numeric}
    row.update({name: [levels[0]] for name, levels in spec.categorical.items()})
    obs = pd.DataFrame(row, index=["declared"])
    region = spec.regions[0] if spec.regions else None
    endpoint = None if kind == "survival" else np.zeros(1)
    return design_matrix(obs, endpoint, spec=spec, region=region, path="statistics")[1]


def below_small_cell(target: np.ndarray, *, kind: Kind, min_cell: int) -> bool:
    """True when a member's labelled samples fall under the small-cell rule for this endpoint.

    >>> below_small_cell(np.r_[np.ones(2), np.zeros(40)], kind="binary", min_cell=5)
    True
    >>> below_small_cell(np.r_[np.ones(6), np.zeros(40)], kind="binary", min_cell=5)
    False
    """
    target = np.asarray(target, dtype=np.float64)
    labelled = target[~np.isnan(target.reshape(len(target), -1)).any(axis=1)]
    if kind == "binary":
        return min(int((labelled == 1).sum()), int((labelled == 0).sum())) < min_cell
    if kind == "survival":
        return int((labelled[:, 1] == 1).sum()) < min_cell
    return len(labelled) < min_cell


def site_statistics(
    Y: np.ndarray,
    target: np.ndarray,
    obs: pd.DataFrame,
    *,
    kind: Kind,
    design: EndpointDesign,
    measured: np.ndarray | None = None,
    cox_beta: np.ndarray | None = None,
    weight: float = 1.0,
    path: str = "",
) -> dict[str, np.ndarray] | None:
    """One member's summable pieces of one endpoint; ``None`` when the member is below the small-cell rule.

    Parameters
    ----------
    Y
        ``(n, p)`` log-scale expression (``log1p`` of normalized counts, not z-scored).
    target
        ``(n,)`` 0/1 (binary) or numbers (regression), or ``(n, 2)`` ``[time, event]``; NaN = missing.
    obs
        The ``n`` samples' covariates (obs columns named in the design).
    design
        The declared design, this member's region and the small-cell rule.
    measured
        ``(p,)`` bool: False where the member did not measure the feature (it contributes nothing there).
    cox_beta
        Survival: the covariates' coefficients of the federated Cox fit so far (default zeros).
    weight
        Linear models: this member's precision weight (:func:`next_member_weight`; 1 = unweighted).
    """
    target = np.asarray(target, dtype=np.float64)
    n = Y.shape[0] if sp.issparse(Y) else len(Y)
    if len(target) != n or len(obs) != n:
        raise ValueError(f"{path or 'site_statistics'}: Y has {n} rows, target {len(target)}, obs {len(obs)}")
    if below_small_cell(target, kind=kind, min_cell=design.min_cell):
        log.info("%s: below the small-cell rule (min_cell=%d): nothing sent for this endpoint", kind, design.min_cell)
        return None
    rows = np.flatnonzero(~np.isnan(target.reshape(len(target), -1)).any(axis=1))
    covariates = obs.iloc[rows]
    # a CSR matrix stays sparse for the linear pieces; a dense one is read by blocks of columns, each
    # taking the labelled rows then (no copy of all of them)
    whole_rows = sp.issparse(Y) or is_chunked(Y) or rows.size == n  # a chunked Y: a view of those rows
    values, subset = (_rows(Y, rows), None) if whole_rows else (np.asarray(Y), rows)
    if kind == "survival":
        Z, _ = design_matrix(covariates, None, spec=design.spec, region=design.region, path=path)
        beta = np.zeros(Z.shape[1]) if cox_beta is None else np.asarray(cox_beta, dtype=np.float64)
        # the Cox pieces read columns of every row: a chunked member's labelled rows are read whole here
        values = values.csr() if is_chunked(values) else values
        values = values.toarray() if sp.issparse(values) else values
        pieces = site_cox_score_pieces(
            values, target[rows, 0], target[rows, 1], Z, beta, measured=measured, rows=subset
        )
        if design.spec.regions:
            pieces.update(region_slots(pieces, q=Z.shape[1], regions=design.spec.regions, region=design.region))
    else:
        X, _ = design_matrix(covariates, target[rows], spec=design.spec, region=design.region, path=path)
        pieces = site_linear_statistics(values, X, measured=measured, weight=weight, rows=subset)
        if design.detection and kind == "binary":
            pieces.update(detection_pieces(values, target[rows], measured=measured, rows=subset))
    return {key: np.asarray(value, dtype=np.float64).reshape(-1) for key, value in pieces.items()}


def _rows(Y, rows: np.ndarray):
    """``Y``'s ``rows`` (sorted positions); ``Y`` itself, not a copy, when they are all its rows."""
    if is_chunked(Y):
        return Y if rows.size == Y.shape[0] else Y.take(rows)
    Y = Y if sp.issparse(Y) else np.asarray(Y)
    return Y if rows.size == Y.shape[0] else Y[rows]


def detection_pieces(
    Y: np.ndarray, target: np.ndarray, *, measured: np.ndarray | None = None, rows: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per feature, how many of a member's labelled samples detect it (``Y > 0``) and how many are in the
    class: summed across members, they drive :func:`low_detection`. Counts only, like ``samples``.

    >>> pieces = detection_pieces(np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]), np.array([1.0, 0.0, 0.0]))
    >>> pieces["detected"].tolist(), pieces["positives"].tolist()
    ([1.0, 2.0], [1.0, 1.0])
    """
    Y, target = (Y if sp.issparse(Y) or is_chunked(Y) else np.asarray(Y)), np.asarray(target, dtype=np.float64)
    measured = np.ones(Y.shape[1], dtype=bool) if measured is None else np.asarray(measured, dtype=bool)
    if is_chunked(Y) or sp.issparse(Y):  # from the nonzeros (a chunked Y: a block of rows at a time)
        detected = np.zeros(Y.shape[1])
        for _, part in Y.blocks() if is_chunked(Y) else [(0, sp.csr_matrix(Y))]:
            detected += _detected_nonzeros(part)
    else:  # a block of columns at a time: no (samples x features) mask
        take = slice(None) if rows is None else rows  # ``rows``: the samples ``target`` is of (dense Y)
        blocks = [Y[take, lo : lo + _COLUMN_BLOCK] for lo in range(0, Y.shape[1], _COLUMN_BLOCK)]
        detected = np.concatenate([np.count_nonzero(b > 0, axis=0) for b in blocks]) if blocks else np.zeros(0)
    detected = np.where(measured, detected, 0).astype(np.float64)
    positives = np.where(measured, float((target == 1).sum()), 0.0)
    return {"detected": detected, "positives": positives}


def _detected_nonzeros(Y: sp.csr_matrix) -> np.ndarray:
    """Per column, how many of a CSR matrix's stored values are above 0, :data:`_NONZERO_BLOCK` of them at
    a time (no mask as large as the matrix)."""
    detected, block = np.zeros(Y.shape[1]), _NONZERO_BLOCK
    for lo in range(0, Y.nnz, block):
        data, indices = Y.data[lo : min(lo + block, Y.nnz)], Y.indices[lo : min(lo + block, Y.nnz)]
        detected += np.bincount(indices[data > 0], minlength=Y.shape[1])
    return detected


def low_detection(summed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """``(p,)`` True where a feature is detected in fewer samples than the smaller class holds: edgeR's
    ``filterByExpr`` rule (a feature must be expressed in at least ``min.group`` samples, the smallest group
    size), with detection (a non-zero count) as its expression threshold. It reads only the summed counts,
    never which samples are in which class, so under the null the kept features' p-values stay uniform;
    ``None`` without detection counts (values that are not counts, or a kind other than binary).

    The counts are rounded to whole numbers first: summed under CKKS they carry its noise (~1e-6), and a
    feature detected in exactly as many samples as the smaller class holds must not be kept or dropped by
    the noise of one encryption.

    >>> low_detection({"detected": np.array([3.0, 9.0, 4.0 - 1e-6]), "positives": np.array([4.0, 4.0, 4.0]),
    ...                "samples": np.array([20.0, 20.0, 20.0 + 1e-6])}).tolist()
    [True, False, False]
    """
    if "detected" not in summed or "positives" not in summed:
        return None
    positives = np.rint(np.asarray(summed["positives"], dtype=np.float64))
    smaller = np.minimum(positives, np.rint(np.asarray(summed["samples"], dtype=np.float64)) - positives)
    return np.rint(np.asarray(summed["detected"], dtype=np.float64)) < smaller


def next_member_weight(
    Y: np.ndarray,
    target: np.ndarray,
    obs: pd.DataFrame,
    summed: Mapping[str, np.ndarray],
    *,
    design: EndpointDesign,
    weight: float,
    measured: np.ndarray | None = None,
) -> float:
    """This member's next precision weight from the consortium's fit of the summed (weighted) pieces: the
    inverse of its residual variance relative to the fit (limma's ``arrayWeights(var.group=member)``,
    a moment step; every member computes its own, only the weighted sums leave it)."""
    target = np.asarray(target, dtype=np.float64)
    rows = np.flatnonzero(~np.isnan(target))
    X, columns = design_matrix(obs.iloc[rows], target[rows], spec=design.spec, region=design.region)
    p = np.asarray(summed["members"]).size
    pieces = {key: np.asarray(value, dtype=np.float64) for key, value in summed.items()}
    pieces["xtx"], pieces["xty"] = pieces["xtx"].reshape(p, -1), pieces["xty"].reshape(p, len(columns))
    fit = fit_linear_models(pieces, columns=columns)
    factor = member_variance_factor(_rows(Y, rows), X, fit, measured=measured, weight=weight)
    return 1.0 / factor if np.isfinite(factor) and factor > 0 else weight


def site_cox_fit(
    target: np.ndarray, obs: pd.DataFrame, *, design: EndpointDesign, beta: np.ndarray, path: str = ""
) -> dict[str, np.ndarray] | None:
    """A member's pieces of one Newton step of the covariates' Cox model (``None`` below the small-cell rule
    or without covariates: nothing to fit)."""
    target = np.asarray(target, dtype=np.float64)
    if below_small_cell(target, kind="survival", min_cell=design.min_cell):
        return None
    rows = np.flatnonzero(~np.isnan(target).any(axis=1))
    Z, _ = design_matrix(obs.iloc[rows], None, spec=design.spec, region=design.region, path=path)
    if Z.shape[1] == 0:
        return None
    pieces = site_cox_fit_pieces(target[rows, 0], target[rows, 1], Z, np.asarray(beta, dtype=np.float64))
    return {key: np.asarray(value, dtype=np.float64).reshape(-1) for key, value in pieces.items()}


def next_cox_step(summed: Mapping[str, np.ndarray], beta: np.ndarray, *, previous: CoxStep | None = None) -> CoxStep:
    """One Newton step of the covariates' Cox model from the summed pieces (halved back when the summed log
    partial likelihood fell since ``previous``); every member computes the same, reading the same sum."""
    return newton_step(summed, np.asarray(beta, dtype=np.float64), previous=previous)


@dataclass
class EndpointStatistics:
    """One endpoint's released statistics: the table by p, the withheld rows and, by region, the subgroups."""

    kind: str
    table: pd.DataFrame
    withheld: int = 0
    regions: pd.DataFrame | None = None
    design: dict = field(default_factory=dict)

    def markers(self, *, direction: Literal["up", "down"] = "up") -> pd.DataFrame:
        """Features higher (``up``) or lower (``down``) with the endpoint, strongest statistic first, as
        scanpy orders ``rank_genes_groups``."""
        effect, statistic = EFFECT[self.kind], STATISTIC[self.kind]
        side = self.table[effect] > 0 if direction == "up" else self.table[effect] < 0
        return self.table[side].sort_values(statistic, ascending=direction == "down", kind="mergesort")


def endpoint_statistics(
    summed: Mapping[str, np.ndarray],
    *,
    kind: Kind,
    spec: DesignSpec,
    feature_names: Sequence[str],
    trend: bool = False,
    robust: bool = False,
    min_members: int = 1,
) -> EndpointStatistics:
    """The released statistics of one endpoint from the members' summed pieces.

    Rows with contributors but fewer than ``min_members`` of them are withheld (counted, never shown).
    """
    names = np.asarray([str(f) for f in feature_names], dtype=object)
    p = names.size
    summed = {key: np.asarray(value, dtype=np.float64) for key, value in summed.items()}
    if "members" not in summed or summed["members"].shape != (p,):
        raise ValueError(
            f"summed statistics: 'members' must have shape ({p},) (one per panel feature); "
            f"found {None if 'members' not in summed else summed['members'].shape}"
        )
    contributing = summed["members"] > 0.5
    allowed = summed["members"] > min_members - 0.5
    withheld = int((contributing & ~allowed).sum())
    if withheld:
        log.info("%d feature(s) withheld: fewer than %d contributing members", withheld, min_members)
    design = {"formula": spec.formula, "min_members": int(min_members), "method": METHODS[kind]}
    low = low_detection(summed)
    if low is not None:
        filtered = contributing & allowed & low
        allowed = allowed & ~low
        design["filtered"] = {"rule": LOW_DETECTION_RULE, "features": int(filtered.sum())}
        if filtered.any():
            log.info("%d feature(s) not tested: %s", int(filtered.sum()), LOW_DETECTION_RULE)
    columns = design_columns(spec, kind=kind)
    design["columns"] = list(columns)
    if kind == "survival":
        pieces = _masked(summed, allowed)
        table = cox_score_table(pieces, q=len(columns), feature_names=names)
        regions = None
        if spec.regions:
            by_feature, regions = cox_region_tables(pieces, q=len(columns), regions=spec.regions, feature_names=names)
            table = table.merge(by_feature, on="feature", how="left")
            regions = regions[regions["feature"].isin(set(table["feature"]))].reset_index(drop=True)
            design["interaction"] = "score test of equal log hazard ratios across regions at gamma = 0"
        return EndpointStatistics(kind=kind, table=table, withheld=withheld, regions=regions, design=design)
    pieces = _masked(summed, allowed)
    pieces["xtx"] = pieces["xtx"].reshape(p, -1)
    pieces["xty"] = pieces["xty"].reshape(p, len(columns))
    interaction = [c for c in columns if c.startswith(f"{ENDPOINT}:{REGION_TAG}")]
    main = [c for c in columns if c not in interaction]
    fit = fit_linear_models(_select(pieces, columns, main), columns=main)
    moderated = ebayes(fit, trend=trend, robust=robust)
    table = top_table(fit, moderated, coef=ENDPOINT, feature_names=names)
    design.update(
        trend=trend, robust=robust, df_prior=_scalar(moderated.df_prior), s2_prior=_scalar(moderated.s2_prior)
    )
    regions = None
    if interaction:
        table, regions = _by_region(
            pieces, columns, interaction, spec=spec, table=table, names=names, trend=trend, robust=robust
        )
    return EndpointStatistics(kind=kind, table=table, withheld=withheld, regions=regions, design=design)


def _by_region(pieces, columns, interaction, *, spec, table, names, trend, robust):
    """Per region the endpoint's effect with its 95% interval, the endpoint x region interaction (ordinary F
    test, as OLS gives it) and Cochran's Q / I² across the regions' effects."""
    fit = fit_linear_models(pieces, columns=columns)
    moderated = ebayes(fit, trend=trend, robust=robust)
    effects, ses, rows = [], [], []
    for region in spec.regions:
        weights = {ENDPOINT: 1.0}
        if region != spec.regions[0]:
            weights[f"{ENDPOINT}:{REGION_TAG}{region}]"] = 1.0
        estimate, se, _, pvalue = contrast_effects(fit, moderated, weights=weights)
        effects.append(estimate)
        ses.append(se)
        half = student_t.ppf(0.975, moderated.df_total) * se
        rows.append(
            pd.DataFrame(
                {
                    "feature": names,
                    "region": region,
                    "effect": estimate,
                    "se": se,
                    "ci_low": estimate - half,
                    "ci_high": estimate + half,
                    P_VALUE: pvalue,
                }
            )
        )
    F, f_p, _, _ = f_test(fit, coefs=interaction)
    Q, q_p, I2 = cochran_q(np.column_stack(effects), np.column_stack(ses))
    extra = pd.DataFrame({"feature": names, "interaction_F": F, "interaction_p": f_p, "Q": Q, "Q_p": q_p, "I2": I2})
    table = table.merge(extra, on="feature", how="left")
    long = pd.concat(rows, ignore_index=True)
    long = long[long["feature"].isin(set(table["feature"])) & np.isfinite(long["effect"])]
    return table, long.reset_index(drop=True)


def _masked(summed: Mapping[str, np.ndarray], allowed: np.ndarray) -> dict[str, np.ndarray]:
    """The pieces with withheld features zeroed (they then count as measured by no one)."""
    p = allowed.size
    out = {}
    for key, value in summed.items():
        if value.size == 0 or value.size % p:  # an empty piece (a Cox model without covariates) has no rows
            out[key] = value
            continue
        shaped = value.reshape(p, -1)
        out[key] = np.where(allowed[:, None], shaped, 0.0).reshape(value.shape)
    return out


def _select(pieces: Mapping[str, np.ndarray], columns: Sequence[str], keep: Sequence[str]) -> dict[str, np.ndarray]:
    """The pieces of the sub-model with only the ``keep`` columns: sub-blocks of XᵀX and Xᵀy."""
    if list(keep) == list(columns):
        return dict(pieces)
    k, index = len(columns), [list(columns).index(c) for c in keep]
    p = pieces["members"].size
    upper = np.triu_indices(k)
    full = np.zeros((p, k, k))
    full[:, upper[0], upper[1]] = pieces["xtx"].reshape(p, -1)
    full = np.triu(full) + np.transpose(np.triu(full, 1), (0, 2, 1))
    sub = full[:, index][:, :, index]
    kept = np.triu_indices(len(index))
    out = dict(pieces)
    out["xtx"] = sub[:, kept[0], kept[1]]
    out["xty"] = pieces["xty"].reshape(p, k)[:, index]
    return out


def _scalar(value) -> float | None:
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return float(value) if np.isfinite(value) else None
    return float(np.nanmedian(value))


def bh(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg over the finite p-values (NaN stays NaN).

    >>> bh(np.array([0.01, 0.04, np.nan, 0.03])).round(3).tolist()
    [0.03, 0.04, nan, 0.04]
    """
    out = np.full(np.shape(pvalues), np.nan)
    finite = np.isfinite(pvalues)
    if finite.any():
        out[finite] = false_discovery_control(np.asarray(pvalues)[finite], method="bh")
    return out


def rank_genes_groups_record(table: pd.DataFrame, *, group: str, kind: Kind) -> dict:
    """One group's results in the layout of scanpy's ``adata.uns["rank_genes_groups"]``, in scanpy's order:
    by score, highest first (features up with the endpoint first, those down with it last).

    ``logfoldchanges`` holds the effect on scanpy's log2 scale for ``"binary"`` (``logFC / ln 2``, as the
    expression is natural-log ``log1p``); the slope or the log hazard ratio otherwise (``params["effect"]``).
    """
    effect, statistic = EFFECT[kind], STATISTIC[kind]
    missing = [c for c in ("feature", effect, statistic, P_VALUE, ADJ_P) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; pass the table of endpoint_statistics")
    ordered = table.sort_values(statistic, ascending=False, kind="mergesort")
    values = ordered[effect].to_numpy(dtype=np.float64)
    lfc = values / np.log(2) if kind == "binary" else values
    columns = {
        "names": (ordered["feature"].to_numpy(dtype=object), "O"),
        "scores": (ordered[statistic], "float32"),
        "pvals": (ordered[P_VALUE], "float64"),
        "pvals_adj": (ordered[ADJ_P], "float64"),
        "logfoldchanges": (lfc, "float32"),
    }
    record = {
        name: pd.DataFrame({group: np.asarray(vals)}).to_records(index=False, column_dtypes={group: dtype})
        for name, (vals, dtype) in columns.items()
    }
    effects = {"binary": "log2 fold change", "regression": "slope", "survival": "log hazard ratio per unit"}
    record["params"] = {
        "groupby": group,
        "reference": "rest",
        "method": METHODS[kind],
        "use_raw": False,
        "layer": None,
        "corr_method": "benjamini-hochberg",
        "effect": effects[kind],
    }
    return record


__all__ = [
    "ADJ_P",
    "EFFECT",
    "LINEAR_KEYS",
    "P_VALUE",
    "STATISTIC",
    "EndpointDesign",
    "EndpointStatistics",
    "below_small_cell",
    "design_columns",
    "endpoint_statistics",
    "next_cox_step",
    "next_member_weight",
    "rank_genes_groups_record",
    "site_cox_fit",
    "site_statistics",
    "uniform_columns",
]
