"""Exact federated association statistics from per-member sufficient statistics.

Each member runs :func:`site_statistics` on its own samples; the server only adds the arrays
element-wise (:func:`combine`, possibly under CKKS); whoever holds the sum runs
:func:`association_table`. The result equals the pooled analysis stratified by member:

- ``"binary"``: Welch difference of mean log expression per member, combined over members with the
  sample-size weights of a stratified (Cochran-Mantel-Haenszel / van Elteren) analysis,
  ``w = n1 n0 / (n1 + n0)``, and each member's Welch variance (z test). With one member it is exactly
  Welch's t statistic. The effect is the difference of mean log values, a natural-log fold change when
  ``X`` is ``log1p`` of normalized counts. (Inverse-variance weights were tried and dropped: on sparse
  single-cell genes a member's variance estimate is too noisy to weight by; see benchmarks/science.py.)
- ``"regression"``: OLS ``target ~ x + C(member)``; effect = slope, t test with ``N - M - 1`` df.
- ``"survival"``: Cox score (log-rank type) test stratified by member, Breslow ties, at beta = 0.
  The effect is the one-step Newton estimate from beta = 0 of the log hazard ratio per pooled
  within-member SD of ``x``: ``U / I * sd``. The test is exact; the effect is an approximation,
  close to the fitted Cox coefficient for weak effects.

Sent arrays (all float64, shape ``(p,)``, summed across members), see :data:`KEYS`:

- every kind: ``samples`` (samples used) and ``members`` (1.0 where the member contributed).
- binary: ``weighted_effect`` (``w d``), ``weight`` (``w``) and ``weighted_variance`` (``w^2 v``), with
  ``d`` the difference of class means and ``v = s1^2/n1 + s0^2/n0``.
- regression: ``sxx``, ``sxy``, ``syy``: within-member centered sums of squares and cross-products.
- survival: ``score`` (``U``), ``information`` (``I``) and ``sxx`` (within-member centered sum of
  squares of ``x``, for the pooled within-member SD).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, norm
from scipy.stats import t as student_t

log = logging.getLogger(__name__)

Kind = Literal["binary", "regression", "survival"]
KEYS: dict[str, tuple[str, ...]] = {
    "binary": ("weighted_effect", "weight", "weighted_variance", "samples", "members"),
    "regression": ("sxx", "sxy", "syy", "samples", "members"),
    "survival": ("score", "information", "sxx", "samples", "members"),
}
COLUMNS = ["feature", "statistic", "effect", "pvalue", "qvalue", "members"]
METHODS = {
    "binary": "federated_stratified_welch",
    "regression": "federated_ols_member_fixed_effect",
    "survival": "federated_cox_score_stratified",
}
# a variance below this (relative to the squared mean) is a constant feature up to rounding
_RELATIVE_ZERO_VARIANCE = 1e-12
# float64 elements per survival work block (about 32 MiB each), bounding memory for large p
_BLOCK_ELEMENTS = 2**22


_COLUMN_BLOCK = 2048


def site_statistics(
    X: np.ndarray,
    target: np.ndarray,
    *,
    kind: Kind,
    measured: np.ndarray | None = None,
    min_cell: int = 5,
) -> dict[str, np.ndarray]:
    """Per-feature sufficient statistics of one member, ready to be summed across members.

    Parameters
    ----------
    X
        ``(n, p)`` log-scale expression (e.g. ``log1p`` of normalized counts, not z-scored).
        Unmeasured columns may hold anything (NaN included); measured ones must be finite.
    target
        ``(n,)`` 0/1 labels (binary), ``(n,)`` floats (regression) or ``(n, 2)`` ``[time, event]``
        (survival). Rows with a NaN label are dropped.
    kind
        ``"binary"``, ``"regression"`` or ``"survival"``.
    measured
        ``(p,)`` bool, False where this member did not measure the feature: it contributes nothing
        there. Also the way to withhold low-variance features whose weights would be very large.
    min_cell
        Small-cell protection: with fewer than ``min_cell`` samples in either class (binary),
        labelled samples (regression) or events (survival), the member contributes nothing at all.

    Returns
    -------
    dict
        The arrays named in ``KEYS[kind]``, float64 of shape ``(p,)``, zero where the member does not
        contribute (unmeasured feature, zero within-member variance, or small cells).
    """
    X, target, measured = _validated(X, target, kind=kind, measured=measured, min_cell=min_cell)
    n, p = X.shape
    rows = np.flatnonzero(~np.isnan(target).reshape(n, -1).any(axis=1))
    columns = np.flatnonzero(measured)
    bad = [int(c) for c in columns if not np.isfinite(X[rows, c]).all()] if not np.isfinite(X).all() else []
    if bad:
        raise ValueError(
            f"X: {len(bad)} measured feature(s) hold non-finite values (first: column {bad[0]}); "
            "impute them or mark them False in `measured`"
        )
    compute = {"binary": _binary_pieces, "regression": _regression_pieces, "survival": _survival_pieces}[kind]
    y = target[rows]
    out = {key: np.zeros(p) for key in KEYS[kind]}
    # every statistic is per feature: blocks of columns bound the temporaries (20k features x 2,000
    # samples would otherwise copy the matrix several times over)
    for start in range(0, len(columns), _COLUMN_BLOCK):
        block = columns[start : start + _COLUMN_BLOCK]
        pieces = compute(X[np.ix_(rows, block)], y, min_cell=min_cell)
        if pieces is None:
            log.info("%s: member below the small-cell limit (min_cell=%d); it contributes nothing", kind, min_cell)
            return out
        keep = pieces["members"] > 0
        for key in KEYS[kind]:
            out[key][block] = np.where(keep, pieces[key], 0.0)
    return out


def combine(stats: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of members' :func:`site_statistics` (what the server does)."""
    stats = list(stats)
    if not stats:
        raise ValueError("combine: no member statistics given; pass one dict per member")
    keys, shape = sorted(stats[0]), np.shape(next(iter(stats[0].values()), None))
    for i, member in enumerate(stats):
        if sorted(member) != keys:
            raise ValueError(
                f"combine: stats[{i}] has keys {sorted(member)}, stats[0] has {keys}; "
                "all members must compute the same kind on the same feature panel"
            )
        for key in keys:
            if np.shape(member[key]) != shape:
                raise ValueError(
                    f"combine: stats[{i}]['{key}'] has shape {np.shape(member[key])}, expected {shape}; "
                    "align every member to the same feature panel first"
                )
    return {key: np.sum([np.asarray(m[key], dtype=np.float64) for m in stats], axis=0) for key in keys}


def association_table(summed: Mapping[str, np.ndarray], *, kind: Kind, feature_names: Sequence[str]) -> pd.DataFrame:
    """Final association table from the summed statistics.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature, statistic, effect, pvalue, qvalue, members``; one row per feature with at
        least one contributing member, sorted by p-value (ties by feature name). ``qvalue`` is
        Benjamini-Hochberg over the rows kept.
    """
    _check_kind(kind)
    missing = [key for key in KEYS[kind] if key not in summed]
    if missing:
        raise ValueError(f"summed statistics lack {missing} needed for kind '{kind}'; found {sorted(summed)}")
    names = np.asarray(list(feature_names), dtype=object)
    s = {key: np.asarray(summed[key], dtype=np.float64) for key in KEYS[kind]}
    if any(v.shape != names.shape for v in s.values()):
        raise ValueError(f"feature_names has {names.size} names but the statistics have shape {s['members'].shape}")
    # > 0.5, not > 0: under CKKS a sum of zeros decrypts to small noise
    keep = s["members"] > 0.5
    s = {key: v[keep] for key, v in s.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic, effect, pvalue = {"binary": _binary_test, "regression": _ols_test, "survival": _score_test}[kind](s)
    qvalue = np.full(pvalue.shape, np.nan)
    finite = np.isfinite(pvalue)
    if finite.any():
        qvalue[finite] = false_discovery_control(pvalue[finite], method="bh")
    table = pd.DataFrame(
        {
            "feature": names[keep],
            "statistic": statistic,
            "effect": effect,
            "pvalue": pvalue,
            "qvalue": qvalue,
            "members": np.rint(s["members"]).astype(int),
        }
    )
    return table.sort_values(["pvalue", "feature"], kind="mergesort", na_position="last").reset_index(drop=True)


def rank_genes_groups_record(table: pd.DataFrame, *, group: str, kind: Kind) -> dict:
    """One group's results in the layout of scanpy's ``adata.uns["rank_genes_groups"]``.

    ``sc.get.rank_genes_groups_df(adata, group=group)`` reads it back. ``logfoldchanges`` holds the
    effect on scanpy's log2 scale for ``"binary"`` (``effect / ln 2``); for the other kinds it holds
    the effect as is (slope, or log hazard ratio per SD), which ``params["effect"]`` records.
    """
    _check_kind(kind)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; pass the output of association_table")
    effect = table["effect"].to_numpy(dtype=np.float64)
    lfc = effect / np.log(2) if kind == "binary" else effect
    columns = {
        "names": (table["feature"].to_numpy(dtype=object), "O"),
        "scores": (table["statistic"], "float32"),
        "pvals": (table["pvalue"], "float64"),
        "pvals_adj": (table["qvalue"], "float64"),
        "logfoldchanges": (lfc, "float32"),
    }
    record = {
        name: pd.DataFrame({group: np.asarray(values)}).to_records(index=False, column_dtypes={group: dtype})
        for name, (values, dtype) in columns.items()
    }
    effects = {"binary": "log2 fold change", "regression": "slope", "survival": "log hazard ratio per SD"}
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


def _check_kind(kind: str) -> None:
    if kind not in get_args(Kind):
        raise ValueError(f"kind must be one of {list(get_args(Kind))}, got {kind!r}")


def _validated(X, target, *, kind, measured, min_cell):
    _check_kind(kind)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples x features), got shape {X.shape}")
    n, p = X.shape
    target = np.asarray(target, dtype=np.float64)
    expected = (n, 2) if kind == "survival" else (n,)
    if target.shape != expected:
        layout = "[time, event] columns" if kind == "survival" else "one value per sample"
        raise ValueError(f"target for kind '{kind}' must have shape {expected} ({layout}), got {target.shape}")
    measured = np.ones(p, dtype=bool) if measured is None else np.asarray(measured)
    if measured.shape != (p,) or measured.dtype != bool:
        raise ValueError(f"measured must be a bool array of shape ({p},), got {measured.dtype} {measured.shape}")
    if int(min_cell) < 2:
        raise ValueError(f"min_cell must be at least 2 (variances need two samples), got {min_cell}")
    return X, target, measured


def _constant(var: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return var <= _RELATIVE_ZERO_VARIANCE * (1.0 + mean**2)


def _binary_pieces(x, y, *, min_cell):
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"binary target must be 0/1 (or NaN for missing); found {np.unique(y)[:5].tolist()}")
    g1, g0 = x[y == 1], x[y == 0]
    if min(len(g1), len(g0)) < min_cell:
        return None
    m1, m0 = g1.mean(axis=0), g0.mean(axis=0)
    v1, v0 = g1.var(axis=0, ddof=1), g0.var(axis=0, ddof=1)
    contributes = ~(_constant(v1, m1) & _constant(v0, m0))
    n1, n0 = len(g1), len(g0)
    weight = np.where(contributes, n1 * n0 / (n1 + n0), 0.0)
    return {
        "weighted_effect": weight * (m1 - m0),
        "weight": weight,
        "weighted_variance": weight**2 * (v1 / n1 + v0 / n0),
        "samples": np.full(x.shape[1], float(len(y))),
        "members": contributes.astype(np.float64),
    }


def _centered(x):
    mean = x.mean(axis=0)
    xc = x - mean
    sxx = np.einsum("ij,ij->j", xc, xc)
    return xc, sxx, ~_constant(sxx / len(x), mean)


def _regression_pieces(x, y, *, min_cell):
    if len(y) < min_cell:
        return None
    xc, sxx, contributes = _centered(x)
    yc = y - y.mean()
    return {
        "sxx": sxx,
        "sxy": yc @ xc,
        "syy": np.full(x.shape[1], float(yc @ yc)),
        "samples": np.full(x.shape[1], float(len(y))),
        "members": contributes.astype(np.float64),
    }


def _survival_pieces(x, y, *, min_cell):
    time, event = y[:, 0], y[:, 1]
    if not np.isin(event, (0.0, 1.0)).all():
        raise ValueError(f"survival target column 1 (event) must be 0/1; found {np.unique(event)[:5].tolist()}")
    is_event = event == 1
    if is_event.sum() < min_cell:
        return None
    order = np.argsort(time, kind="stable")
    time, is_event = time[order], is_event[order]
    # U and I do not change when x shifts; centering keeps the risk-set moments well conditioned
    xc, sxx, contributes = _centered(x[order])
    n, p = xc.shape
    # Breslow: every event at time t sees the same risk set, all samples with time >= t
    start = np.searchsorted(time, time[is_event], side="left")
    at_risk = (n - start)[:, None]
    score, information = np.empty(p), np.empty(p)
    width = max(1, _BLOCK_ELEMENTS // n)
    for lo in range(0, p, width):
        block = xc[:, lo : lo + width]
        tail_sum = np.cumsum(block[::-1], axis=0)[::-1][start]
        tail_sq = np.cumsum((block**2)[::-1], axis=0)[::-1][start]
        risk_mean = tail_sum / at_risk
        score[lo : lo + width] = (block[is_event] - risk_mean).sum(axis=0)
        information[lo : lo + width] = np.maximum(tail_sq / at_risk - risk_mean**2, 0.0).sum(axis=0)
    return {
        "score": score,
        "information": information,
        "sxx": sxx,
        "samples": np.full(p, float(n)),
        "members": contributes.astype(np.float64),
    }


def _binary_test(s):
    effect = s["weighted_effect"] / s["weight"]
    z = s["weighted_effect"] / np.sqrt(s["weighted_variance"])
    return z, effect, 2.0 * norm.sf(np.abs(z))


def _ols_test(s):
    slope = s["sxy"] / s["sxx"]
    df = s["samples"] - s["members"] - 1.0
    residual = np.maximum(s["syy"] - slope * s["sxy"], 0.0)
    t = slope / np.sqrt(residual / df / s["sxx"])
    pvalue = np.where(df > 0, 2.0 * student_t.sf(np.abs(t), np.maximum(df, 1.0)), np.nan)
    return np.where(df > 0, t, np.nan), slope, pvalue


def _score_test(s):
    z = s["score"] / np.sqrt(s["information"])
    sd = np.sqrt(s["sxx"] / (s["samples"] - s["members"]))
    return z, s["score"] / s["information"] * sd, 2.0 * norm.sf(np.abs(z))
