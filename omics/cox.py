"""Federated Cox proportional hazards stratified by member (each member one stratum), Efron ties: a Newton
fit of the covariates, then every feature's score test given that fit.

The stratified log partial likelihood, gradient and information are sums over members, so each member
computes pieces on its own samples, a server only adds them (plaintext or CKKS) and every member computes
the same next step from the same sum.

1. Fit: from ``beta = 0`` every member sends :func:`site_cox_fit_pieces`; :func:`newton_step` on the sum
   gives the next beta, until ``converged``.
2. Test: every member sends :func:`site_cox_score_pieces` at the fitted beta; :func:`cox_score_table` gives
   per feature the efficient (Neyman C(alpha)) score test of ``gamma = 0`` in ``exp(Z beta + x gamma)``:
   ``U_eff = U_x - I_xz' I_zz^-1 U_z``, ``V_eff = I_xx - I_xz' I_zz^-1 I_xz``, ``z = U_eff / sqrt(V_eff)``,
   with ``U_z``, ``I_zz`` summed over the members that measured the feature. The correction keeps the test
   valid when beta is not that subset's MLE; at its MLE (``U_z = 0``) it is the usual ``U_x^2 (I^-1)_xx``.

Efron: at an event time with ``d`` tied events ``D`` and risk set ``R``, the ``l``-th denominator is
``S0_l = sum_R w - (l/d) sum_D w`` (``l < d``). Sums over ``l`` reduce to scalars per event time, and the
linear risk-set terms to one weight per sample, so all features are done at once with cumulative sums.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, norm

log = logging.getLogger(__name__)

FIT_KEYS = ("loglik", "gradient", "information", "events", "samples")
SCORE_KEYS = ("score_x", "info_xx", "info_xz", "score_z", "info_zz", "samples", "events", "members")
COLUMNS = ["feature", "statistic", "logHR", "se", "P.Value", "adj.P.Val", "members", "samples", "events"]
# float64 elements per work array of a block of features (32 MiB each), bounding memory for large p
_BLOCK_ELEMENTS = 2**22
# a variance below this (relative to 1 + squared mean) is a constant feature up to rounding
_RELATIVE_ZERO_VARIANCE = 1e-12
# an eigenvalue of the correlation-scaled information below this (relative) is a non-estimable direction;
# far above CKKS noise (~1e-9 relative), far below any covariate worth estimating
_SINGULAR = 1e-8
# V_eff / I_xx below this: x is (nearly) a combination of the covariates where it is measured: no test
_ALIASED = 1e-8
# relative drop of the log likelihood tolerated before a Newton step is halved (above CKKS noise)
_LOGLIK_SLACK = 1e-7


@dataclass(frozen=True)
class CoxStep:
    """One Newton step of the federated Cox fit (a pure function of the summed pieces, beta and the
    previous step).

    Attributes
    ----------
    beta, step, loglik
        The next coefficients; the largest absolute change from the beta the pieces were computed at; the
        log partial likelihood there.
    converged
        The step is below ``tol`` and so is the relative log likelihood gain it predicts.
    anchor, anchor_loglik, halved
        The last accepted beta and its log likelihood; ``halved`` when the log likelihood fell and this
        step went halfway back towards ``anchor``.
    """

    beta: np.ndarray
    step: float
    loglik: float
    converged: bool
    anchor: np.ndarray
    anchor_loglik: float
    halved: bool = False


@dataclass(frozen=True)
class _Efron:
    """One member's risk sets, samples sorted by time (``order``)."""

    order: np.ndarray  # permutation sorting the samples by time
    start: np.ndarray  # (T,) first sorted position at risk at each distinct event time
    rows: np.ndarray  # sorted positions of the events
    first: np.ndarray  # (T,) start of each tie group within ``rows``
    w: np.ndarray  # (n,) exp(eta - max eta), sorted
    a: np.ndarray  # (n,) sum over event times of the linear weights, so that sum_t (A_R c1 - A_D c2) = a' A
    c345: np.ndarray  # (3, T): sum_l phi^j / S0_l^2 for j = 0, 1, 2
    loglik: float

    def sums(self, A: np.ndarray, *, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Risk-set and tied-set weighted sums of the columns of ``A`` (sorted), each ``(T, k)``;
        ``overwrite``: ``A`` (float64) is the work array, no (samples x k) copy is made (same values)."""
        if overwrite:
            A *= self.w[:, None]
            wA = A
        else:
            wA = self.w[:, None] * A
        tied = np.add.reduceat(wA[self.rows], self.first, axis=0)
        backwards = wA[::-1]
        np.cumsum(backwards, axis=0, out=backwards)  # a running sum in place: the same additions in order
        return wA[self.start], tied

    def cross(self, AR, AD, BR, BD) -> np.ndarray:
        """``sum_t sum_l S1A_l S1B_l' / S0_l^2`` from the risk-set and tied-set sums of A and B."""
        c3, c4, c5 = self.c345[:, :, None]
        return AR.T @ (BR * c3 - BD * c4) + AD.T @ (BD * c5 - BR * c4)


def site_cox_fit_pieces(time, event, Z, beta) -> dict[str, np.ndarray]:
    """One member's pieces of the Cox log partial likelihood at ``beta`` (Efron ties), to be summed.

    Parameters
    ----------
    time, event
        ``(n,)`` follow-up times and 0/1 event indicators (1 = event, 0 = censored).
    Z
        ``(n, q)`` covariate design columns, no intercept (the member's baseline hazard absorbs it).
    beta
        ``(q,)`` current coefficients.

    Returns
    -------
    dict
        float64 ``loglik`` (1,), ``gradient`` (q,), ``information`` (q(q+1)/2,): the upper triangle
        (``np.triu_indices`` order) of minus the Hessian, ``events`` (1,) and ``samples`` (1,).
    """
    time, event, Z, beta = _checked(time, event, Z, beta)
    n, q = Z.shape
    upper = np.triu_indices(q)
    out = {"loglik": np.zeros(1), "gradient": np.zeros(q), "information": np.zeros(len(upper[0]))}
    out.update(events=np.array([event.sum()]), samples=np.array([float(n)]))
    efron, Zs = _prepared(time, event, Z, beta)
    if efron is None:
        log.info("cox fit: member without events contributes only its sample count")
        return out
    gradient, information = _gradient_information(efron, Zs)
    out.update(loglik=np.array([efron.loglik]), gradient=gradient, information=information[upper])
    return out


def newton_step(
    summed: Mapping[str, np.ndarray],
    beta: np.ndarray,
    *,
    tol: float = 1e-9,
    previous: CoxStep | None = None,
    names: Sequence[str] | None = None,
) -> CoxStep:
    """The next beta from the members' summed :func:`site_cox_fit_pieces` (solves ``I delta = U``).

    Parameters
    ----------
    summed
        Element-wise sum over members of :func:`site_cox_fit_pieces` computed at ``beta``.
    beta
        ``(q,)`` the coefficients the pieces were computed at.
    tol
        Convergence: largest absolute step, and predicted relative log likelihood gain, below ``tol``.
    previous
        The step that proposed ``beta``. When given and the log likelihood fell below the last accepted
        one, the step is halved back towards it instead (still a pure function of the sum and beta).
    names
        ``q`` covariate names for error messages (default ``Z[:, k]``).

    Raises
    ------
    ValueError
        Missing or misshapen pieces, or a singular information: the message names the covariates that
        are not estimable (constant within every member, or collinear with others).
    """
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    q = beta.size
    shapes = {"loglik": (1,), "gradient": (q,), "information": (q * (q + 1) // 2,)}
    for key, shape in shapes.items():
        if key not in summed or np.shape(summed[key]) != shape:
            found = np.shape(summed[key]) if key in summed else "missing"
            raise ValueError(
                f"summed['{key}'] must have shape {shape} for beta of shape ({q},), got {found}; "
                "pass the element-wise sum of site_cox_fit_pieces computed at this beta"
            )
    loglik = float(np.asarray(summed["loglik"])[0])
    if not np.isfinite(beta).all() or not np.isfinite(loglik):
        raise ValueError(f"beta {beta} or its loglik {loglik} is not finite; restart the fit from beta = 0")
    if previous is not None and loglik < previous.anchor_loglik - _LOGLIK_SLACK * (1.0 + abs(previous.anchor_loglik)):
        halfway = (previous.anchor + beta) / 2.0
        log.info("cox fit: loglik fell from %.6g to %.6g; halving the step", previous.anchor_loglik, loglik)
        step = float(np.abs(halfway - beta).max())
        return CoxStep(halfway, step, loglik, False, previous.anchor, previous.anchor_loglik, halved=True)
    gradient = np.asarray(summed["gradient"], dtype=np.float64)
    information = _symmetric(np.asarray(summed["information"], dtype=np.float64)[None], q)[0]
    delta = _solve(information, gradient, names=names)
    step = float(np.abs(delta).max()) if q else 0.0
    gain = 0.5 * float(gradient @ delta)
    converged = step < tol and gain <= tol * (1.0 + abs(loglik))
    return CoxStep(beta + delta, step, loglik, bool(converged), beta, loglik)


def site_cox_score_pieces(X, time, event, Z, beta, *, measured=None, rows=None) -> dict[str, np.ndarray]:
    """One member's pieces of every feature's score test given the covariates' fit, to be summed.

    Parameters
    ----------
    X
        ``(n, p)`` log-scale expression. Unmeasured columns may hold anything (NaN included); measured
        ones must be finite.
    time, event, Z, beta
        As in :func:`site_cox_fit_pieces` (``beta`` is the federated fit of the covariates).
    measured
        ``(p,)`` bool, False where this member did not measure the feature: it contributes zeros there.
    rows
        The positions of the ``n`` rows of ``X`` that ``time``, ``event`` and ``Z`` describe (default: all
        of them); each block of columns reads them, so the rows are never copied whole.

    Returns
    -------
    dict
        float64, summed per feature at ``(beta, gamma = 0)``: ``score_x`` (p,) ``U_x``; ``info_xx`` (p,);
        ``info_xz`` (p*q,) = ``(p, q)`` flattened; ``score_z`` (p*q,) ``U_z``; ``info_zz``
        (p*q(q+1)/2,) = ``(p, q(q+1)/2)`` upper triangles; ``samples``, ``events``, ``members`` (p,).
        A member contributes to a feature (``members`` 1) when it measured it, has an event and ``x`` is
        not constant among its samples (a constant adds nothing to ``U_x``, ``I_xx`` or ``I_xz``);
        everything else is zero there.
    """
    time, event, Z, beta = _checked(time, event, Z, beta)
    X = np.asarray(X)  # float32 log values stay float32: each block of columns is made float64 as it is read
    X = X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)
    n, q = Z.shape
    if X.ndim != 2 or (X.shape[0] if rows is None else len(rows)) != n:
        raise ValueError(
            f"X must be 2-D with one row per sample ({n}, p), got shape {X.shape}; "
            "pass samples as rows and features as columns"
        )
    p = X.shape[1]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    measured = np.ones(p, dtype=bool) if measured is None else np.asarray(measured)
    if measured.shape != (p,) or measured.dtype != bool:
        raise ValueError(
            f"measured must be a bool array of shape ({p},), got {measured.dtype} {measured.shape}; "
            "pass one True/False per column of X"
        )
    upper = np.triu_indices(q)
    out = {key: np.zeros((p, width)) for key, width in _widths(q).items()}
    columns = np.flatnonzero(measured)
    width = max(1, _BLOCK_ELEMENTS // max(n, 1))
    blocks = [columns[lo : lo + width] for lo in range(0, columns.size, width)]
    bad = np.concatenate([b[~np.isfinite(X[np.ix_(rows, b)]).all(axis=0)] for b in blocks]) if blocks else columns
    if bad.size:
        raise ValueError(
            f"X: {bad.size} measured feature(s) hold non-finite values (first: column {bad[0]}); "
            "impute them or mark them False in `measured`"
        )
    efron, Zs = _prepared(time, event, Z, beta)
    if efron is None or not columns.size:
        log.info("cox score: member without events or measured features contributes nothing")
        return {key: value.reshape(-1) for key, value in out.items()}
    gradient, information = _gradient_information(efron, Zs)
    residual = -efron.a
    residual[efron.rows] += 1.0
    ZR, ZD = efron.sums(Zs)
    for lo in range(0, columns.size, width):
        block = columns[lo : lo + width]
        x = X[np.ix_(rows[efron.order], block)].astype(np.float64, copy=False)
        mean = x.mean(axis=0)
        x -= mean  # U_x, I_xx and I_xz do not change when x shifts; centering keeps the sums well conditioned
        contributes = np.einsum("ij,ij->j", x, x) / n > _RELATIVE_ZERO_VARIANCE * (1.0 + mean**2)
        c3, c4, c5 = efron.c345[:, :, None]
        ax = efron.a[:, None] * x
        out["score_x"][block, 0] = np.where(contributes, residual @ x, 0.0)
        weighted, ax_z = np.einsum("ij,ij->j", ax, x), ax.T @ Zs
        del ax
        XR, XD = efron.sums(x, overwrite=True)  # x's last use: its risk-set sums are made in it
        del x  # the block's (samples x features) array, before the (event times x features) ones below
        # XR * (XR * c3 - 2.0 * XD * c4) + XD * XD * c5, in place: the same operations, two temporaries
        inner, other = XR * c3, np.multiply(2.0, XD)
        other *= c4
        inner -= other
        inner *= XR
        np.multiply(XD, XD, out=other)
        other *= c5
        inner += other
        out["info_xx"][block, 0] = np.where(contributes, weighted - inner.sum(axis=0), 0.0)
        out["info_xz"][block] = np.where(contributes[:, None], ax_z - efron.cross(XR, XD, ZR, ZD), 0.0)
        out["members"][block, 0] = contributes
    keep = out["members"][:, 0] > 0
    out["score_z"][keep] = gradient
    out["info_zz"][keep] = information[upper]
    out["samples"][keep] = n
    out["events"][keep] = event.sum()
    return {key: value.reshape(-1) for key, value in out.items()}


def cox_score_table(summed: Mapping[str, np.ndarray], *, q: int, feature_names: Sequence[str]) -> pd.DataFrame:
    """Per feature the efficient score test of its log hazard ratio given the covariates, from the sum.

    Parameters
    ----------
    summed
        Element-wise sum over members of :func:`site_cox_score_pieces`.
    q
        Number of covariate columns in ``Z`` (0 for the plain stratified score test).
    feature_names
        ``p`` names, in the order of the columns of ``X``.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature, statistic, logHR, se, P.Value, adj.P.Val, members, samples, events``, one row
        per feature with a contributing member, sorted by ``P.Value`` then feature. ``statistic`` is
        ``z = U_eff / sqrt(V_eff)`` (two-sided normal p); ``logHR = U_eff / V_eff`` is the one-step log
        hazard ratio per unit of ``x`` and ``se = 1 / sqrt(V_eff)``; ``adj.P.Val`` is Benjamini-Hochberg
        over the rows with a p-value. NaN where ``x`` is (nearly) a combination of the covariates.
    """
    names = np.asarray([str(f) for f in feature_names], dtype=object)
    p, q = names.size, int(q)
    if q < 0:
        raise ValueError(f"q must be the number of covariate columns (>= 0), got {q}")
    s = {}
    for key, width in _widths(q).items():
        if key not in summed or np.size(summed[key]) != p * width:
            found = np.shape(summed[key]) if key in summed else "missing"
            raise ValueError(
                f"summed['{key}'] must hold {p * width} values ({p} features x {width}) for q={q}, "
                f"got {found}; pass the sum of site_cox_score_pieces and the matching q, feature_names"
            )
        s[key] = np.asarray(summed[key], dtype=np.float64).reshape(p, width)
    keep = s["members"][:, 0] > 0.5  # > 0.5, not > 0: under CKKS a sum of zeros decrypts to small noise
    s = {key: value[keep] for key, value in s.items()}
    u, v = s["score_x"][:, 0], s["info_xx"][:, 0]
    if q:
        izz = _symmetric(s["info_zz"], q)
        diag = np.einsum("kii->ki", izz)
        # a covariate constant in every contributing member has no information: leave it out of the projection
        present = diag > _SINGULAR * np.maximum(diag.max(axis=0, initial=0.0), np.finfo(float).tiny)
        scale = np.where(present, 1.0 / np.sqrt(np.where(present, diag, 1.0)), 0.0)
        values, vectors = np.linalg.eigh(izz * scale[:, :, None] * scale[:, None, :])
        top = values.max(axis=1, keepdims=True, initial=0.0)
        inverse = np.where(values > _SINGULAR * top, 1.0 / np.where(values > 0, values, 1.0), 0.0)
        a = np.einsum("kji,kj->ki", vectors, s["info_xz"] * scale)
        b = np.einsum("kji,kj->ki", vectors, s["score_z"] * scale)
        u = u - np.einsum("ki,ki,ki->k", a, inverse, b)
        v = v - np.einsum("ki,ki,ki->k", a, inverse, a)
    testable = (v > _ALIASED * s["info_xx"][:, 0]) & (s["info_xx"][:, 0] > 0)
    if (~testable).any():
        log.info("cox score: %d feature(s) collinear with the covariates where measured: no test", (~testable).sum())
    v = np.where(testable, v, np.nan)
    z = u / np.sqrt(v)
    pvalue = 2.0 * norm.sf(np.abs(z))
    adjusted = np.full(pvalue.shape, np.nan)
    finite = np.isfinite(pvalue)
    if finite.any():
        adjusted[finite] = false_discovery_control(pvalue[finite], method="bh")
    columns = {"feature": names[keep], "statistic": z, "logHR": u / v, "se": 1.0 / np.sqrt(v)}
    table = pd.DataFrame({**columns, "P.Value": pvalue, "adj.P.Val": adjusted})
    for key in ("members", "samples", "events"):
        table[key] = np.rint(s[key][:, 0]).astype(int)
    return table.sort_values(["P.Value", "feature"], kind="mergesort", na_position="last").reset_index(drop=True)


def _widths(q: int) -> dict[str, int]:
    """Values per feature of each score piece."""
    return dict(zip(SCORE_KEYS, (1, 1, q, q, q * (q + 1) // 2, 1, 1, 1), strict=True))


def _checked(time, event, Z, beta):
    time = np.asarray(time, dtype=np.float64)
    if time.ndim != 1 or not np.isfinite(time).all():
        raise ValueError(
            f"time must be a 1-D array of finite follow-up times, got shape {time.shape} "
            f"with {int((~np.isfinite(time)).sum())} non-finite; drop samples without follow-up"
        )
    n = time.size
    event = np.asarray(event, dtype=np.float64)
    if event.shape != (n,) or not np.isin(event, (0.0, 1.0)).all():
        raise ValueError(
            f"event must be ({n},) of 0/1 (1 = event, 0 = censored), got shape {event.shape} "
            f"with values {np.unique(event)[:5].tolist()}"
        )
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z.reshape(n, 0) if Z.size == 0 and Z.ndim < 2 else Z
    if Z.ndim != 2 or Z.shape[0] != n or not np.isfinite(Z).all():
        raise ValueError(
            f"Z must be ({n}, q) finite covariate columns without intercept, got shape {Z.shape}; "
            "pass np.empty((n, 0)) for no covariates and impute missing covariates"
        )
    beta = np.asarray(beta, dtype=np.float64)
    if beta.shape != (Z.shape[1],) or not np.isfinite(beta).all():
        raise ValueError(
            f"beta must be ({Z.shape[1]},) finite (one per column of Z), got {beta.shape}: {beta}; "
            "start from np.zeros(q)"
        )
    return time, event, Z, beta


def _prepared(time, event, Z, beta) -> tuple[_Efron | None, np.ndarray]:
    """The Efron risk structure and the centered covariates sorted by time (centering leaves every piece
    unchanged: a common shift of eta cancels between the numerator and the denominators)."""
    Zc = Z - Z.mean(axis=0) if Z.shape[0] else Z
    efron = _efron(time, event, Zc @ beta)
    return efron, (Zc[efron.order] if efron is not None else Zc)


def _efron(time, event, eta) -> _Efron | None:
    order = np.argsort(time, kind="stable")
    t, eta = time[order], eta[order]
    rows = np.flatnonzero(event[order] == 1)
    if not rows.size:
        return None
    eta = eta - eta.max()  # overflow guard; the log likelihood is unchanged (see _prepared)
    w = np.exp(eta)
    times, first, ties = np.unique(t[rows], return_index=True, return_counts=True)
    start = np.searchsorted(t, times, side="left")
    risk0 = np.cumsum(w[::-1])[::-1][start]
    tied0 = np.add.reduceat(w[rows], first)
    k = np.repeat(np.arange(times.size), ties)  # each event's tie group
    phi = (np.arange(rows.size) - first[k]) / ties[k]  # l / d
    inv = 1.0 / (risk0[k] - phi * tied0[k])
    c1, c2 = (np.bincount(k, weights=phi**j * inv, minlength=times.size) for j in (0, 1))
    c345 = np.stack([np.bincount(k, weights=phi**j * inv**2, minlength=times.size) for j in (0, 1, 2)])
    # sum_t (A_R c1 - A_D c2) = sum_i w_i A_i (C1(t_i) - event_i c2(t_i)), C1 cumulating c1 over event times
    through = np.searchsorted(times, t, side="right") - 1
    a = w * np.where(through >= 0, np.cumsum(c1)[np.maximum(through, 0)], 0.0)
    a[rows] -= w[rows] * c2[k]
    loglik = float(eta[rows].sum() + np.log(inv).sum())
    return _Efron(order, start, rows, first, w, a, c345, loglik)


def _gradient_information(efron: _Efron, Zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gradient = Zs[efron.rows].sum(axis=0) - efron.a @ Zs
    ZR, ZD = efron.sums(Zs)
    information = (efron.a[:, None] * Zs).T @ Zs - efron.cross(ZR, ZD, ZR, ZD)
    return gradient, (information + information.T) / 2.0


def _symmetric(upper: np.ndarray, q: int) -> np.ndarray:
    """``(k, q(q+1)/2)`` upper triangles to ``(k, q, q)`` symmetric matrices."""
    full = np.zeros((upper.shape[0], q, q))
    i, j = np.triu_indices(q)
    full[:, i, j] = upper
    full[:, j, i] = upper
    return full


def _solve(information: np.ndarray, gradient: np.ndarray, *, names: Sequence[str] | None) -> np.ndarray:
    q = gradient.size
    if not q:
        return np.zeros(0)
    names = [f"Z[:, {k}]" for k in range(q)] if names is None else [str(name) for name in names]
    if len(names) != q:
        raise ValueError(f"names must hold {q} covariate names, got {len(names)}: {names}")
    diag = np.diag(information)
    present = diag > _SINGULAR * max(diag.max(), np.finfo(float).tiny)
    scale = 1.0 / np.sqrt(np.where(present, diag, 1.0))
    values, vectors = np.linalg.eigh(information * np.outer(scale, scale))
    weak = values <= _SINGULAR * max(values.max(), 1.0)
    if (~present).any() or weak.any():
        involved = ~present | (np.abs(vectors[:, weak]) > 0.1).any(axis=1)
        bad = [name for name, b in zip(names, involved, strict=True) if b]
        raise ValueError(
            f"the Cox information is singular: covariate(s) {bad} "
            "are not estimable (constant within every member, or collinear with other covariates); "
            "drop them from Z at every member and restart the fit"
        )
    return scale * (vectors @ ((vectors.T @ (gradient * scale)) / values))
