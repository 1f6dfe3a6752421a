"""A run of a synthetic clinical consortium (``consortium synth --kind trial|sites``) against its truth.

Reads the run's ``report.json``, the consortium's ``ground_truth.json`` and, for the sites, the test-split
predictions each member kept (``sites/<member>/predictions.npz``, the federated model's on its held-out
sites). What the issue's acceptance asks:

- dropout: the federated C-index within members at least the pooled one - 0.02, above the local one for
  the smallest member (intervals beside), and at least 4 of the 5 planted drivers in the top 8 model inputs
  of each shared endpoint's ranking;
- site selection: Spearman's rank correlation between the predicted and the true enrollment rate of the
  held-out sites at least 0.6, the federated R2 and Spearman (within members, against the observed rate)
  each at least the pooled one - 0.02, and the share of the non-enrolling sites found in the bottom quarter
  of the ranking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from jobs.site_outputs import read_predictions, site_folder
from omics.io import read_member
from schema.config import ConsortiumConfig

TOP_FEATURES = 8
MIN_DRIVERS = 4
MARGIN = 0.02
MIN_SPEARMAN = 0.6
BOTTOM_SHARE = 0.25
N_BOOT = 1000


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; give the run's report.json and the consortium's ground_truth.json"
        )
    return json.loads(path.read_text())


def drivers_recovered(report: Mapping[str, Any], truth: Mapping[str, Any], *, top: int = TOP_FEATURES) -> dict:
    """Per endpoint of the model rankings: its top ``top`` inputs and the planted drivers among them (a
    categorical driver counts when any of its one-hot inputs is there)."""
    drivers = {d["column"]: set(d["inputs"]) for d in truth["drivers"]}
    out = {}
    for endpoint, rows in report["biomarkers"]["model"].items():
        ranked = [r["feature"] for r in sorted(rows, key=lambda r: r["rank"])][:top]
        found = [column for column, inputs in drivers.items() if inputs & set(ranked)]
        out[endpoint] = {"top": ranked, "recovered": found, "n_recovered": len(found), "n_planted": len(drivers)}
    return out


def dropout_against_truth(report: Mapping[str, Any], truth: Mapping[str, Any]) -> dict[str, Any]:
    """The dropout use case's acceptance figures (see the module's docstring), each check with its verdict."""
    endpoint = report["endpoints"]["dropout"]
    sizes = {name: len(info["patients"]) for name, info in truth["members"].items()}
    smallest = min(sizes, key=sizes.get)
    small = report["members"][smallest]["tasks"]["dropout"]
    recovered = drivers_recovered(report, truth)
    return {
        "c_index_within_members": _arms(endpoint),
        "smallest_member": {"member": smallest, "patients": sizes[smallest], **_arms(small)},
        "drivers": recovered,
        # the federated model's calibration of discontinued on each member's test split (Brier, slope, in the large)
        "calibration": {
            member: (info["tasks"].get("discontinued", {}).get("other_metrics") or {}).get("federated", {})
            for member, info in report["members"].items()
        },
        "checks": {
            "federated_at_least_pooled_minus_0.02": bool(endpoint["federated"] >= endpoint["pooled"] - MARGIN),
            "smallest_member_federated_above_local": bool(small["federated"] > small["local"]),
            "drivers_in_top_8": bool(all(r["n_recovered"] >= MIN_DRIVERS for r in recovered.values())),
        },
    }


def sites_against_truth(
    report: Mapping[str, Any], truth: Mapping[str, Any], *, config: ConsortiumConfig, run: str | Path
) -> dict[str, Any]:
    """The site-selection use case's acceptance figures (see the module's docstring), each with its verdict."""
    held_out = held_out_sites(truth, config=config, run=run)
    spearman = within_member_spearman(
        [g["mu"].to_numpy() for _, g in held_out.groupby("member", sort=False)],
        [g["predicted"].to_numpy() for _, g in held_out.groupby("member", sort=False)],
    )
    observed = within_member_spearman(
        [g["enrolled_per_month"].to_numpy() for _, g in held_out.groupby("member", sort=False)],
        [g["predicted"].to_numpy() for _, g in held_out.groupby("member", sort=False)],
    )
    endpoint = report["endpoints"]["enrolled_per_month"]
    bottom = bottom_of_ranking(held_out)
    return {
        "spearman_true_rate": spearman,
        "spearman_observed_rate": observed,
        "spearman_by_member": {
            m: float(spearmanr(g["mu"], g["predicted"]).statistic) for m, g in held_out.groupby("member", sort=False)
        },
        "r2_within_members": _arms(endpoint),
        "spearman_observed_by_arm": endpoint.get("spearman_r", {}),
        "non_enrolling_in_bottom_quarter": bottom,
        "checks": {
            "spearman_at_least_0.6": bool(spearman["estimate"] >= MIN_SPEARMAN),
            "federated_at_least_pooled_minus_0.02": bool(
                endpoint["federated"] >= endpoint["pooled"] - MARGIN
                and _at_least(endpoint.get("spearman_r", {}), "federated", "pooled")
            ),
        },
    }


def _at_least(figures: Mapping[str, float], arm: str, other: str) -> bool:
    """``arm``'s figure at least ``other``'s - 0.02; true when either is absent (a run without baselines)."""
    if arm not in figures or other not in figures:
        return True
    return figures[arm] >= figures[other] - MARGIN


def held_out_sites(truth: Mapping[str, Any], *, config: ConsortiumConfig, run: str | Path) -> pd.DataFrame:
    """Every member's test-split sites: observed endpoints, true rate ``mu`` and the federated prediction."""
    frames = []
    for member in config.members:
        obs = read_member(member.data).obs
        test = obs[obs["split"].astype(str) == "test"]
        kept = read_predictions(site_folder(Path(run) / "sites", member.name))
        target = kept["target"]["enrolled_per_month"]
        if not np.allclose(target, test["enrolled_per_month"].to_numpy(dtype=np.float64), equal_nan=True):
            raise ValueError(f"{member.name}: the kept test predictions do not line up with the test split's sites")
        rates = truth["members"][member.name]["sites"]
        frames.append(
            pd.DataFrame(
                {
                    "member": member.name,
                    "site": test.index,
                    "mu": [rates[s]["mu"] for s in test.index],
                    "enrolled_per_month": target,
                    "non_enrolling": test["non_enrolling"].to_numpy(dtype=np.float64),
                    "predicted": kept["prediction"]["enrolled_per_month"],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def within_member_spearman(
    truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray], *, seed: int = 0, n_boot: int = N_BOOT
) -> dict[str, Any]:
    """Spearman's correlation within each member, averaged with weights by its sites, with a 95% percentile
    bootstrap interval (sites resampled within each member)."""
    rng = np.random.default_rng(seed)
    weights = np.array([len(t) for t in truths], dtype=np.float64)
    weights /= weights.sum()
    estimate = float(sum(w * _rho(t, p) for w, t, p in zip(weights, truths, predictions, strict=True)))
    resampled = np.zeros(n_boot)
    for w, t, p in zip(weights, truths, predictions, strict=True):
        rows = rng.integers(0, len(t), size=(n_boot, len(t)))
        resampled += w * np.array([_rho(t[r], p[r]) for r in rows])
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return {"estimate": estimate, "ci": [float(low), float(high)], "n": int(sum(len(t) for t in truths))}


def bottom_of_ranking(held_out: pd.DataFrame, *, share: float = BOTTOM_SHARE) -> dict[str, float]:
    """Each member ranks its held-out sites by predicted rate: of the sites that enrolled no patient, the
    share found in the bottom ``share`` of its ranking (a random ranking finds ``share`` of them)."""
    found = total = in_bottom = 0
    for _, group in held_out.groupby("member", sort=False):
        cut = int(math.ceil(share * len(group)))
        bottom = group.nsmallest(cut, "predicted")
        found += int(bottom["non_enrolling"].sum())
        total += int(group["non_enrolling"].sum())
        in_bottom += cut
    return {
        "bottom_share": share,
        "non_enrolling": total,
        "found_in_bottom": found,
        "share_found": found / total if total else math.nan,
        "non_enrolling_rate_in_bottom": found / in_bottom if in_bottom else math.nan,
        "non_enrolling_rate_overall": total / len(held_out) if len(held_out) else math.nan,
    }


def scores_against_truth(scores: str | Path, truth: Mapping[str, Any], *, member: str, column: str) -> dict:
    """``consortium score``'s CSV of a member's current patients or candidate sites against their true risk
    or rate: Spearman's correlation of ``column`` with the truth (``risk`` for patients, ``mu`` for sites)."""
    table = pd.read_csv(scores)
    current = truth["members"][member]["current"]
    key = "mu" if truth["kind"] == "sites" else "risk"
    true = np.array([current[str(s)][key] for s in table["sample"]])
    return {"member": member, "column": column, "n": len(table), "spearman": _rho(true, table[column].to_numpy())}


def _rho(truth: np.ndarray, prediction: np.ndarray) -> float:
    if np.ptp(truth) == 0 or np.ptp(prediction) == 0:
        return math.nan
    return float(spearmanr(truth, prediction).statistic)


def _arms(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The federated, local and pooled figures with their intervals, and the paired differences."""
    arms = ("federated", "local", "pooled")
    differences = entry.get("difference") or {}
    return {
        **{a: entry.get(a) for a in arms},
        "ci": {a: (entry.get("ci") or {}).get(a) for a in arms},
        "difference": {k: differences[k] for k in ("federated-local", "federated-pooled") if k in differences},
    }
