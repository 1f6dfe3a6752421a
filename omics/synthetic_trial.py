"""A synthetic consortium of historical trial patients whose dropout drivers are known.

Each member (a sponsor) holds the patients of its past trials, obs columns only (no omics): age, sex,
distance to the site, early visit adherence (the share of the first visits attended), early adverse
events, the arm, and nuisance columns with no effect (BMI, region, smoking, years of education). Time
to discontinuation follows a Weibull proportional-hazards model: five planted drivers with known signs
act on the log-hazard, every member has its own baseline hazard and its own mix of patients (a rural
member lives farther from its sites, one member randomizes 2:1), and follow-up is administratively
censored at the trial's end. ``ground_truth.json`` holds the drivers, their signs and every patient's
true risk; ``<member>.current.h5ad`` holds patients now on trial (no endpoints) for ``consortium score``.
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
    standardized,
    with_missing,
    write_current,
    write_obs_member,
    write_truth,
)

log = logging.getLogger(__name__)

DEFAULT_SIZES = (250, 700, 1400)
TRIAL_MONTHS = 30.0  # the trial ends here; patients enrolled over its first ENROLLMENT_MONTHS
ENROLLMENT_MONTHS = 12.0
WEIBULL_SHAPE = 1.3
ARMS = ("control", "treatment")
REGIONS = ("north", "south", "east", "west")
YES_NO = ("no", "yes")
SEXES = ("F", "M")

# the planted drivers: effect on the log-hazard of dropout per unit of ``(value - center) / scale``
DRIVERS: dict[str, dict[str, Any]] = {
    "distance_km": {"effect": 0.6, "transform": "log", "center": float(np.log(20.0)), "scale": 0.7},
    "visit_adherence": {"effect": -0.8, "center": 0.8, "scale": 0.15},
    "adverse_events": {"effect": 0.5, "center": 1.0, "scale": 1.0},
    "age": {"effect": -0.4, "center": 60.0, "scale": 12.0},
    "arm": {"effect": 0.6, "level": "treatment"},
}
NUISANCE = ("bmi", "sex", "region", "smoker", "education_years")

# each member's own mix: baseline monthly hazard, median distance (km), adverse-event rate, share on treatment
_MIXES = (
    {"hazard": 0.028, "distance": 45.0, "ae_rate": 0.8, "treatment": 0.5, "age": 58.0},
    {"hazard": 0.036, "distance": 12.0, "ae_rate": 1.3, "treatment": 2 / 3, "age": 63.0},
    {"hazard": 0.022, "distance": 22.0, "ae_rate": 1.0, "treatment": 0.5, "age": 60.0},
)

CLINICAL: list[dict[str, Any]] = [
    {"column": "age", "type": "numeric", "range": [18, 100], "missing": "refuse"},
    {"column": "sex", "type": "categorical", "levels": list(SEXES), "missing": "refuse"},
    {"column": "distance_km", "type": "numeric", "range": [0, 1000], "missing": "refuse"},
    {"column": "visit_adherence", "type": "numeric", "range": [0, 1], "missing": "indicator"},
    {"column": "adverse_events", "type": "numeric", "range": [0, 50], "missing": "refuse"},
    {"column": "arm", "type": "categorical", "levels": list(ARMS), "missing": "refuse"},
    {"column": "bmi", "type": "numeric", "range": [10, 70], "missing": "indicator"},
    {"column": "region", "type": "categorical", "levels": list(REGIONS), "missing": "refuse"},
    {"column": "smoker", "type": "categorical", "levels": list(YES_NO), "missing": "refuse"},
    {"column": "education_years", "type": "numeric", "range": [0, 30], "missing": "refuse"},
]
TASKS = [
    {"name": "discontinued", "type": "binary", "column": "discontinued"},
    {"name": "dropout", "type": "survival", "time": "dropout_time", "event": "discontinued", "time_unit": "months"},
]


def driver_inputs() -> dict[str, list[str]]:
    """Each planted driver's model-input names (a categorical's one-hot columns are ``column=level``)."""
    return {column: [f"arm={level}" for level in ARMS] if column == "arm" else [column] for column in DRIVERS}


def make_trial_consortium(
    out: str | Path, *, sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 0, current_fraction: float = 0.2
) -> ClinicalConsortium:
    """Write ``trial-<letter>.h5ad`` (past patients), ``trial-<letter>.current.h5ad`` (patients to score)
    and ``ground_truth.json`` into ``out``. Deterministic for ``seed``.

    Endpoints, shared by every member: ``discontinued`` (binary) and ``dropout`` (survival: months to
    discontinuation ``dropout_time``, event ``discontinued``, censored at the trial's end).
    """
    out = Path(out)
    members: list[ClinicalMember] = []
    truth_members: dict[str, Any] = {}
    for draw, n in member_draws(out, sizes, seed=seed, prefix="trial", mixes=_MIXES, unit="patients"):
        name, letter, mix, rng = draw.name, draw.letter, draw.mix, draw.rng
        patients = _patients(rng, n, mix)
        risk = true_log_hazard(patients)
        time, event = _follow_up(rng, risk, hazard=mix["hazard"])
        patients["dropout_time"] = time
        patients["discontinued"] = event
        path = out / f"{name}.h5ad"
        adata = write_obs_member(patients, path, prefix=letter, tasks=TASKS, seed=seed)
        current = _patients(rng, max(40, int(current_fraction * n)), mix)
        current_path, current_adata = write_current(current, out, draw, suffix="now")
        truth_members[name] = {
            "baseline_hazard_per_month": mix["hazard"],
            "patients": _risks(adata.obs_names, risk, mix["hazard"]),
            "current": _risks(current_adata.obs_names, true_log_hazard(current), mix["hazard"]),
        }
        members.append(
            ClinicalMember(name, f"Sponsor_{letter.upper()}", path, [dict(t) for t in TASKS], n, current=current_path)
        )
        log.info("wrote %s: %d patients, %d discontinued", path, n, int(event.sum()))
    inputs = driver_inputs()
    truth = {
        "kind": "trial",
        "seed": seed,
        "drivers": [
            {"column": c, "sign": int(np.sign(d["effect"])), "effect": d["effect"], "inputs": inputs[c]}
            for c, d in DRIVERS.items()
        ],
        "nuisance": list(NUISANCE),
        # the report's precision at k reads these: each endpoint's planted model inputs
        "tasks": {t["name"]: [i for c in DRIVERS for i in inputs[c][-1:]] for t in TASKS},
        "risk": "log relative hazard of dropout (member baseline excluded); risk_12m: P(dropout by 12 months)",
        "members": truth_members,
    }
    return ClinicalConsortium("trial", members, CLINICAL, write_truth(out, truth), truth)


def true_log_hazard(patients: pd.DataFrame) -> np.ndarray:
    """The planted log relative hazard of each patient (missing values carry no effect)."""
    lp = np.zeros(len(patients))
    for column, spec in DRIVERS.items():
        if "level" in spec:
            lp += spec["effect"] * (patients[column].astype(str).to_numpy() == spec["level"])
            continue
        values = patients[column].to_numpy(dtype=np.float64)
        if spec.get("transform") == "log":
            values = np.log(values)
        lp += spec["effect"] * standardized(values, center=spec["center"], scale=spec["scale"])
    return lp


def _patients(rng: np.random.Generator, n: int, mix: dict[str, float]) -> pd.DataFrame:
    age = np.clip(rng.normal(mix["age"], 12.0, n), 18, 95).round()
    adherence = np.clip(rng.beta(8.0, 2.0, n), 0.0, 1.0).round(2)
    frame = pd.DataFrame(
        {
            "age": age,
            "sex": categorical(rng.choice(SEXES, n), SEXES),
            "distance_km": np.clip(rng.lognormal(np.log(mix["distance"]), 0.7, n), 0.5, 900).round(1),
            "visit_adherence": with_missing(rng, adherence, 0.06),
            "adverse_events": rng.poisson(mix["ae_rate"], n).astype(np.float64),
            "arm": categorical(np.where(rng.random(n) < mix["treatment"], "treatment", "control"), ARMS),
            "bmi": with_missing(rng, np.clip(rng.normal(27.0, 4.5, n), 15, 60).round(1), 0.1),
            "region": categorical(rng.choice(REGIONS, n), REGIONS),
            "smoker": categorical(rng.choice(YES_NO, n, p=[0.75, 0.25]), YES_NO),
            "education_years": np.clip(rng.normal(13.0, 3.0, n), 0, 25).round(),
        }
    )
    return frame


def _follow_up(rng: np.random.Generator, risk: np.ndarray, *, hazard: float) -> tuple[np.ndarray, np.ndarray]:
    """Weibull time to dropout (months), censored when the trial ends: ``S(t) = exp(-(hazard t)^k e^risk)``."""
    dropout = (rng.exponential(size=risk.size) / np.exp(risk)) ** (1 / WEIBULL_SHAPE) / hazard
    censor = TRIAL_MONTHS - rng.uniform(0.0, ENROLLMENT_MONTHS, risk.size)
    time = np.round(np.maximum(np.minimum(dropout, censor), 0.1), 2)
    return time, (dropout <= censor).astype(np.float64)


def _risks(ids: Sequence[str], risk: np.ndarray, hazard: float) -> dict[str, dict[str, float]]:
    risk_12m = 1.0 - np.exp(-((hazard * 12.0) ** WEIBULL_SHAPE) * np.exp(risk))
    return {
        str(i): {"risk": round(float(r), 5), "risk_12m": round(float(p), 5)}
        for i, r, p in zip(ids, risk, risk_12m, strict=True)
    }
