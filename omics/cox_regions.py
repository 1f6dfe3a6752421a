"""Survival subgroups by region: each feature's log hazard ratio in every region, and the feature x region test.

Each member lies in one region. Beside its score pieces (:func:`omics.cox.site_cox_score_pieces`) it
sends the feature blocks again in its region's slot (zeros in the others): :func:`region_slots`. Summed,
the slots hold each region's ``U_x,r``, ``I_xx,r`` and ``I_xz,r``; the covariates' ``U_z`` and ``I_zz`` are
the consortium's (their coefficients are common, fitted once, stratified by member).

In the model with one log hazard ratio ``gamma_r`` per region, evaluated at ``gamma = 0`` and the fitted
covariates, the efficient score of ``gamma`` is ``U_r = U_x,r - I_xz,r' I_zz^-1 U_z`` and its information
``V = diag(I_xx,r) - B I_zz^-1 B'`` (``B`` the regions' ``I_xz,r`` as rows). Then:

- per region, the one-step log hazard ratio ``U_r / V_rr`` with ``se = 1 / sqrt(V_rr)`` (and its 95% interval
  and score p-value), as :func:`omics.cox.cox_score_table` gives the overall one;
- the interaction: the score test of equal ``gamma_r`` at ``gamma = 0``,
  ``U' V^-1 U - (1'U)^2 / (1'V 1)``, chi-square with (regions - 1) df;
- Cochran's Q and I² of the per-region one-step estimates (:func:`omics.contrasts.cochran_q`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import chi2, norm

from omics.contrasts import cochran_q

REGION_KEYS = ("score_x", "info_xx", "info_xz", "samples", "events", "members")
PREFIX = "region_"
_SINGULAR = 1e-8


def region_slots(pieces: Mapping[str, np.ndarray], *, q: int, regions: Sequence[str], region: str) -> dict:
    """The feature blocks of one member's score pieces in its region's slot, ``(p, R, width)`` flattened.

    >>> pieces = {"score_x": np.array([1.0, 2.0]), "info_xx": np.array([3.0, 4.0]), "info_xz": np.zeros(0),
    ...           "samples": np.array([9.0, 9.0]), "events": np.array([5.0, 5.0]), "members": np.ones(2)}
    >>> region_slots(pieces, q=0, regions=("EU", "US"), region="US")["region_score_x"].tolist()
    [0.0, 1.0, 0.0, 2.0]
    """
    index = list(regions).index(region)
    p = np.asarray(pieces["members"]).size
    out = {}
    for key in REGION_KEYS:
        width = q if key == "info_xz" else 1
        slot = np.zeros((p, len(regions), width))
        slot[:, index, :] = np.asarray(pieces[key], dtype=np.float64).reshape(p, width)
        out[PREFIX + key] = slot.reshape(-1)
    return out


def cox_region_tables(
    summed: Mapping[str, np.ndarray], *, q: int, regions: Sequence[str], feature_names: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(by_feature, long)``: per feature the interaction test, Q and I²; per feature and region the
    one-step log hazard ratio (``effect``), ``se``, 95% interval and score ``P.Value``."""
    names = np.asarray([str(f) for f in feature_names], dtype=object)
    p, R = names.size, len(regions)
    s = {key: np.asarray(summed[PREFIX + key], dtype=np.float64).reshape(p, R, -1) for key in REGION_KEYS}
    u, d = s["score_x"][:, :, 0], s["info_xx"][:, :, 0]
    present = (s["members"][:, :, 0] > 0.5) & (d > 0)
    V = np.zeros((p, R, R))
    V[:, np.arange(R), np.arange(R)] = d
    if q:
        izz_upper = np.asarray(summed["info_zz"], dtype=np.float64).reshape(p, -1)
        izz = np.zeros((p, q, q))
        upper = np.triu_indices(q)
        izz[:, upper[0], upper[1]] = izz_upper
        izz = np.triu(izz) + np.transpose(np.triu(izz, 1), (0, 2, 1))
        inverse = np.linalg.pinv(izz, rcond=_SINGULAR, hermitian=True)
        B = s["info_xz"]  # (p, R, q)
        uz = np.asarray(summed["score_z"], dtype=np.float64).reshape(p, q)
        u = u - np.einsum("prq,pqs,ps->pr", B, inverse, uz)
        V = V - np.einsum("prq,pqs,pts->prt", B, inverse, B)
    diagonal = np.where(present, np.einsum("prr->pr", V), np.nan)
    usable = present & (diagonal > 0)
    effect = np.where(usable, u / np.where(usable, diagonal, 1.0), np.nan)
    se = np.where(usable, 1.0 / np.sqrt(np.where(usable, diagonal, 1.0)), np.nan)
    interaction = np.array([_interaction(u[k], V[k], usable[k]) for k in range(p)])
    Q, q_p, I2 = cochran_q(effect, se)
    by_feature = pd.DataFrame(
        {
            "feature": names,
            "interaction_chi2": interaction,
            "interaction_p": chi2.sf(interaction, usable.sum(axis=1) - 1),
            "Q": Q,
            "Q_p": q_p,
            "I2": I2,
        }
    )
    long = pd.DataFrame(
        {
            "feature": np.repeat(names, R),
            "region": np.tile(np.asarray(regions, dtype=object), p),
            "effect": effect.reshape(-1),
            "se": se.reshape(-1),
            "ci_low": (effect - norm.ppf(0.975) * se).reshape(-1),
            "ci_high": (effect + norm.ppf(0.975) * se).reshape(-1),
            "P.Value": 2.0 * norm.sf(np.abs(effect / se)).reshape(-1),
            "events": np.rint(s["events"][:, :, 0]).reshape(-1),
        }
    )
    return by_feature, long[np.isfinite(long["effect"])].reset_index(drop=True)


def _interaction(u: np.ndarray, V: np.ndarray, usable: np.ndarray) -> float:
    """The score statistic of equal log hazard ratios across the usable regions (NaN with fewer than two)."""
    if usable.sum() < 2:
        return np.nan
    u, V = u[usable], V[np.ix_(usable, usable)]
    ones = np.ones(u.size)
    total = float(u @ np.linalg.solve(V, u))
    return max(0.0, total - float(ones @ u) ** 2 / float(ones @ V @ ones))
