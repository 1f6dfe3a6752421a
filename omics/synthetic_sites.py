"""A synthetic consortium of sponsors holding their past trial sites, with known enrollment effects.

Each member (a sponsor) holds sites, obs columns only: region, specialty, past enrollment rate
(patients a month in earlier trials), competing trials nearby, research staff, years active, and
nuisance columns with no effect (beds, academic or not, the records system). Enrollment follows the
Poisson-gamma model (Anisimov and Fedorov): a site's expected monthly rate ``mu`` comes from the planted
effects (log-linear) and the sponsor's own baseline; its actual rate is ``mu`` times a gamma frailty
(mean 1), and the patients it enrolls over the sponsor's window are Poisson. Endpoints:
``enrolled_per_month`` (regression) and ``non_enrolling`` (binary: no patient in the window).
``ground_truth.json`` holds the effects and every site's true ``mu``; ``<member>.current.h5ad`` holds
candidate sites (no endpoints) to rank with ``consortium score``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omics.synthetic_obs import (
    ClinicalConsortium,
    ClinicalMember,
    categorical,
    member_draws,
    with_missing,
    write_current,
    write_obs_member,
    write_truth,
)

log = logging.getLogger(__name__)

DEFAULT_SIZES = (200, 500, 1000)
WINDOW_MONTHS = 6.0  # every past trial's enrollment window
FRAILTY_SHAPE = 4.0  # gamma frailty of a site's rate: mean 1, variance 1/shape
REGIONS = ("north_america", "europe", "asia_pacific", "latin_america")
SPECIALTIES = ("oncology", "cardiology", "neurology")
YES_NO = ("no", "yes")
RECORDS = ("epic", "cerner", "other")

# planted effects on log(mu): per unit of the column (past rate: per unit of its log)
EFFECTS: dict[str, dict[str, Any]] = {
    "past_enrollment_rate": {"effect": 0.7, "transform": "log"},
    "competing_trials": {"effect": -0.2, "center": 2.0},
    "staff": {"effect": 0.12, "center": 4.0},
    "years_active": {"effect": 0.02, "center": 13.0},
    "specialty": {"effect": {"oncology": -0.35, "cardiology": 0.25, "neurology": 0.0}},
}
NUISANCE = ("region", "beds", "academic", "records_system")

# each sponsor's baseline monthly rate and mix: where its sites are and what they treat
_MIXES = (
    {"baseline": 0.45, "regions": (0.1, 0.2, 0.3, 0.4), "specialties": (0.6, 0.2, 0.2)},
    {"baseline": 0.6, "regions": (0.5, 0.3, 0.1, 0.1), "specialties": (0.3, 0.4, 0.3)},
    {"baseline": 0.5, "regions": (0.25, 0.45, 0.2, 0.1), "specialties": (0.4, 0.3, 0.3)},
)
MEMBER_REGIONS = ("APAC", "US", "EU")

CLINICAL: list[dict[str, Any]] = [
    {"column": "region", "type": "categorical", "levels": list(REGIONS), "missing": "refuse"},
    {"column": "specialty", "type": "categorical", "levels": list(SPECIALTIES), "missing": "refuse"},
    {"column": "past_enrollment_rate", "type": "numeric", "range": [0, 100], "missing": "refuse"},
    {"column": "competing_trials", "type": "numeric", "range": [0, 50], "missing": "refuse"},
    {"column": "staff", "type": "numeric", "range": [0, 100], "missing": "indicator"},
    {"column": "years_active", "type": "numeric", "range": [0, 80], "missing": "indicator"},
    {"column": "beds", "type": "numeric", "range": [0, 5000], "missing": "refuse"},
    {"column": "academic", "type": "categorical", "levels": list(YES_NO), "missing": "refuse"},
    {"column": "records_system", "type": "categorical", "levels": list(RECORDS), "missing": "refuse"},
]
TASKS = [
    {"name": "enrolled_per_month", "type": "regression", "column": "enrolled_per_month"},
    {"name": "non_enrolling", "type": "binary", "column": "non_enrolling"},
]


def make_sites_consortium(
    out: str | Path, *, sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 0, candidate_fraction: float = 0.25
) -> ClinicalConsortium:
    """Write ``sponsor-<letter>.h5ad`` (past sites), ``sponsor-<letter>.current.h5ad`` (candidate sites)
    and ``ground_truth.json`` into ``out``. Deterministic for ``seed``."""
    out = Path(out)
    members: list[ClinicalMember] = []
    truth_members: dict[str, Any] = {}
    for draw, n in member_draws(out, sizes, seed=seed, prefix="sponsor", mixes=_MIXES, unit="sites"):
        name, letter, mix, rng = draw.name, draw.letter, draw.mix, draw.rng
        sites = _sites(rng, n, mix)
        mu = true_rate(sites, baseline=mix["baseline"])
        rate = mu * rng.gamma(FRAILTY_SHAPE, 1.0 / FRAILTY_SHAPE, n)
        enrolled = rng.poisson(rate * WINDOW_MONTHS)
        sites["enrolled_per_month"] = np.round(enrolled / WINDOW_MONTHS, 4)
        sites["non_enrolling"] = (enrolled == 0).astype(np.float64)
        path = out / f"{name}.h5ad"
        adata = write_obs_member(sites, path, prefix=letter, tasks=TASKS, seed=seed)
        candidates = _sites(rng, max(40, int(candidate_fraction * n)), mix)
        candidate_mu = true_rate(candidates, baseline=mix["baseline"])
        current_path, current = write_current(candidates, out, draw, suffix="cand")
        truth_members[name] = {
            "baseline_rate_per_month": mix["baseline"],
            "sites": _rates(adata.obs_names, mu, rate),
            "current": _rates(current.obs_names, candidate_mu, None),
            "non_enrolling_share": float(sites["non_enrolling"].mean()),
        }
        members.append(
            ClinicalMember(
                name,
                f"Sponsor_{letter.upper()}",
                path,
                [dict(t) for t in TASKS],
                n,
                current=current_path,
                region=MEMBER_REGIONS[draw.index % len(MEMBER_REGIONS)],
            )
        )
        log.info("wrote %s: %d sites, %d enrolled none", path, n, int((enrolled == 0).sum()))
    truth = {
        "kind": "sites",
        "seed": seed,
        "effects": [{"column": c, **e} for c, e in EFFECTS.items()],
        "nuisance": list(NUISANCE),
        "tasks": {t["name"]: ["past_enrollment_rate", "competing_trials", "staff", "years_active"] for t in TASKS},
        "rate": "mu: a site's expected patients a month given its columns; rate: mu times the site's gamma frailty",
        "window_months": WINDOW_MONTHS,
        "frailty_shape": FRAILTY_SHAPE,
        "members": truth_members,
    }
    return ClinicalConsortium("sites", members, CLINICAL, write_truth(out, truth), truth)


def true_rate(sites: pd.DataFrame, *, baseline: float) -> np.ndarray:
    """Each site's expected patients a month from the planted effects (a missing value carries none)."""
    log_mu = np.full(len(sites), np.log(baseline))
    for column, spec in EFFECTS.items():
        if isinstance(spec["effect"], dict):
            log_mu += sites[column].astype(str).map(spec["effect"]).fillna(0.0).to_numpy(dtype=np.float64)
            continue
        values = sites[column].to_numpy(dtype=np.float64)
        if spec.get("transform") == "log":
            values = np.log(values)
        centered = values - spec.get("center", 0.0)
        log_mu += spec["effect"] * np.where(np.isnan(centered), 0.0, centered)
    return np.exp(log_mu)


def _sites(rng: np.random.Generator, n: int, mix: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "region": categorical(rng.choice(REGIONS, n, p=mix["regions"]), REGIONS),
            "specialty": categorical(rng.choice(SPECIALTIES, n, p=mix["specialties"]), SPECIALTIES),
            "past_enrollment_rate": np.clip(rng.lognormal(0.0, 0.7, n), 0.05, 50).round(3),
            "competing_trials": rng.poisson(2.0, n).astype(np.float64),
            "staff": with_missing(rng, 1 + rng.poisson(3.0, n), 0.05),
            "years_active": with_missing(rng, rng.integers(1, 26, n), 0.08),
            "beds": np.clip(rng.lognormal(np.log(300), 0.6, n), 20, 4000).round(),
            "academic": categorical(rng.choice(YES_NO, n, p=[0.6, 0.4]), YES_NO),
            "records_system": categorical(rng.choice(RECORDS, n), RECORDS),
        }
    )


def _rates(ids: Sequence[str], mu: np.ndarray, rate: np.ndarray | None) -> dict[str, dict[str, float]]:
    rows = {}
    for k, site in enumerate(ids):
        rows[str(site)] = {"mu": round(float(mu[k]), 5)}
        if rate is not None:
            rows[str(site)]["rate"] = round(float(rate[k]), 5)
    return rows
