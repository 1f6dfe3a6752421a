"""A synthetic consortium whose true biomarkers are known.

Each sample carries the activities of a few latent *programs*; a program raises or lowers the
expression of its genes (the planted biomarkers). Shared programs drive tasks at every member, so a
shared trunk can learn them from everyone; member-specific programs drive only one member's tasks.
Counts are gamma-Poisson (negative binomial) around library-size-scaled means, each member has its
own batch effect (a per-gene shift and a library-size shift), and one member misses a few panel
features. Tasks of every kind: a binary response, a regression target and a survival outcome, with
some labels missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from omics.io import write_member
from omics.split import assign_split

log = logging.getLogger(__name__)

_STEMS = (
    "CD",
    "KRT",
    "IL",
    "TNF",
    "MAP",
    "SLC",
    "ZNF",
    "CCL",
    "CXCL",
    "HLA",
    "COL",
    "RPL",
    "ADAM",
    "WNT",
    "FGF",
    "TGF",
    "NOTCH",
    "SOX",
    "FOX",
    "GATA",
    "KLF",
    "MYO",
    "ATP",
    "ABC",
    "CDK",
    "PIK",
    "STAT",
    "JAK",
)
DEFAULT_SIZES = (300, 800, 2000)
GENES_PER_PROGRAM = 12
N_SHARED_PROGRAMS = 3  # response, regression, survival drivers shared by every member
ENDPOINTS = ("response", "marker", "pfs")  # each member's binary, regression and survival endpoint


@dataclass
class SyntheticMember:
    name: str
    org: str
    path: Path
    tasks: list[dict[str, str]]
    n_samples: int


@dataclass
class SyntheticConsortium:
    panel: list[str]
    members: list[SyntheticMember]
    ground_truth: dict[str, list[str]]
    ground_truth_path: Path
    programs: dict[str, list[str]] = field(default_factory=dict)


def feature_names(n_features: int) -> list[str]:
    """Deterministic, unique, symbol-like feature names (``CD1``, ``KRT1``, ... ``CD2``, ...)."""
    return [f"{_STEMS[i % len(_STEMS)]}{i // len(_STEMS) + 1}" for i in range(n_features)]


def make_consortium(
    out: str | Path,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    n_features: int = 2000,
    seed: int = 0,
    missing_label_fraction: float = 0.1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    shared: Sequence[str] = (),
) -> SyntheticConsortium:
    """Write one ``<member>.h5ad`` per member and ``ground_truth.json`` into ``out``.

    Deterministic for ``seed``. Member ``i`` is called ``pharma-<letter>`` and owns the tasks
    ``<letter>_response`` (binary), ``<letter>_marker`` (regression) and ``<letter>_pfs`` (survival).
    An endpoint named in ``shared`` (``"response"``, ``"marker"``, ``"pfs"``) is instead one endpoint of
    that name at every member (a shared endpoint: its head is federated); its planted features are the
    shared program's and each member's own (the data are the same either way).
    """
    unknown = sorted(set(shared) - set(ENDPOINTS))
    if unknown:
        raise ValueError(f"shared={list(shared)}: unknown endpoint(s) {unknown}; use some of {list(ENDPOINTS)}")
    if len(sizes) < 1 or min(sizes) < 60:
        raise ValueError(f"sizes must give at least one member of >= 60 samples, got {list(sizes)}")
    n_programs = N_SHARED_PROGRAMS + len(sizes)
    if n_features < 2 * n_programs * GENES_PER_PROGRAM:
        raise ValueError(
            f"n_features={n_features} is too small for {n_programs} programs of {GENES_PER_PROGRAM} genes; "
            f"use at least {2 * n_programs * GENES_PER_PROGRAM}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    panel = feature_names(n_features)
    programs = _plant_programs(rng, panel, n_members=len(sizes))
    loadings = _loadings(rng, panel, programs)
    base = rng.normal(0.0, 1.2, size=n_features)  # log-abundance of each gene
    nuisance = rng.normal(0.0, 0.35, size=(6, n_features)) * (rng.random((6, n_features)) < 0.15)

    members: list[SyntheticMember] = []
    truth: dict[str, list[str]] = {}
    for index, n_samples in enumerate(sizes):
        letter = chr(ord("a") + index)
        member_rng = np.random.default_rng([seed, index])
        own = f"specific_{letter}"
        activity = {name: member_rng.normal(size=n_samples) for name in programs if name.startswith("shared")}
        activity[own] = member_rng.normal(size=n_samples)
        counts = _counts(member_rng, base, loadings, activity, nuisance, n_samples, batch_scale=0.3)
        obs, task_truth, tasks = _outcomes(member_rng, letter, activity, programs, missing_label_fraction)
        for task in tasks:
            stem = task["name"].split("_", 1)[1]
            if stem in shared:
                genes = task_truth.pop(task["name"])
                task["name"] = stem
                truth[stem] = list(dict.fromkeys([*truth.get(stem, []), *genes]))
        truth.update(task_truth)
        names = list(panel)
        if index == len(sizes) - 1 and len(sizes) > 1:
            # the largest member's platform lacks 3% of the panel (never a planted gene)
            planted = {g for genes in programs.values() for g in genes}
            droppable = [i for i, g in enumerate(panel) if g not in planted]
            dropped = set(member_rng.choice(droppable, size=int(0.03 * n_features), replace=False).tolist())
            keep = [i for i in range(n_features) if i not in dropped]
            counts, names = counts[:, keep], [panel[i] for i in keep]
        obs.index = [f"{letter}-{i:05d}" for i in range(n_samples)]
        adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=names))
        assign_split(
            adata,
            tasks=[_TaskView(t) for t in tasks],
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
        adata.uns["synthetic"] = {"seed": seed, "member": index, "programs": [p for p in activity]}
        path = out / f"pharma-{letter}.h5ad"
        write_member(adata, path)
        members.append(SyntheticMember(f"pharma-{letter}", f"Pharma_{letter.upper()}", path, tasks, n_samples))
        log.info("wrote %s: %d samples x %d features", path, n_samples, len(names))

    truth_path = out / "ground_truth.json"
    truth_path.write_text(json.dumps({"tasks": truth, "programs": programs, "seed": seed}, indent=2))
    return SyntheticConsortium(
        panel=panel, members=members, ground_truth=truth, ground_truth_path=truth_path, programs=programs
    )


class _TaskView:
    """Attribute access to a task mapping, the shape the split and contract code reads."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.__dict__.update(mapping)


def _plant_programs(rng: np.random.Generator, panel: list[str], *, n_members: int) -> dict[str, list[str]]:
    names = [f"shared_{i + 1}" for i in range(N_SHARED_PROGRAMS)] + [
        f"specific_{chr(ord('a') + i)}" for i in range(n_members)
    ]
    chosen = rng.choice(len(panel), size=len(names) * GENES_PER_PROGRAM, replace=False)
    return {
        name: [panel[i] for i in chosen[k * GENES_PER_PROGRAM : (k + 1) * GENES_PER_PROGRAM]]
        for k, name in enumerate(names)
    }


def _loadings(rng: np.random.Generator, panel: list[str], programs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    position = {g: i for i, g in enumerate(panel)}
    loadings = {}
    for name, genes in programs.items():
        vector = np.zeros(len(panel))
        signs = rng.choice([-1.0, 1.0], size=len(genes), p=[0.3, 0.7])
        vector[[position[g] for g in genes]] = signs * rng.uniform(0.3, 0.6, size=len(genes))
        loadings[name] = vector
    return loadings


def _counts(
    rng: np.random.Generator,
    base: np.ndarray,
    loadings: dict[str, np.ndarray],
    activity: dict[str, np.ndarray],
    nuisance: np.ndarray,
    n_samples: int,
    *,
    batch_scale: float,
) -> np.ndarray:
    log_mean = np.tile(base, (n_samples, 1))
    log_mean += rng.normal(0.0, batch_scale, size=base.size)  # the member's batch effect, gene by gene
    for name, values in activity.items():
        log_mean += np.outer(values, loadings[name])
    log_mean += rng.normal(size=(n_samples, nuisance.shape[0])) @ nuisance
    log_mean += rng.normal(0.0, 0.15, size=log_mean.shape)
    proportions = np.exp(log_mean - log_mean.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(mean=np.log(4e4) + rng.normal(0, 0.2), sigma=0.3, size=(n_samples, 1))
    dispersion = 0.05
    mean = proportions * library * rng.gamma(1 / dispersion, dispersion, size=proportions.shape)
    return rng.poisson(mean)


def _outcomes(
    rng: np.random.Generator,
    letter: str,
    activity: dict[str, np.ndarray],
    programs: dict[str, list[str]],
    missing_fraction: float,
) -> tuple[pd.DataFrame, dict[str, list[str]], list[dict[str, str]]]:
    own = activity[f"specific_{letter}"]
    n = own.size
    logit = 2.0 * activity["shared_1"] + 0.8 * own + rng.normal(0, 0.4, n) - 0.3
    response = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    marker = 1.0 * activity["shared_2"] + 0.4 * own + rng.normal(0, 0.5, n)
    hazard = 0.02 * np.exp(1.1 * activity["shared_3"])
    event_time = rng.exponential(1 / hazard)
    censor_time = rng.uniform(10, 150, n)
    time = np.minimum(event_time, censor_time) + 0.5
    event = (event_time <= censor_time).astype(float)
    for values in (response, marker):
        values[rng.random(n) < missing_fraction] = np.nan
    unlabelled = rng.random(n) < missing_fraction
    time[unlabelled], event[unlabelled] = np.nan, np.nan
    obs = pd.DataFrame(
        {
            "response": response,
            "marker_level": marker,
            "pfs_days": time,
            "pfs_event": event,
            "age": rng.normal(62, 9, n).round(),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    obs["sex"] = obs["sex"].astype("category")
    tasks = [
        {"name": f"{letter}_response", "type": "binary", "column": "response"},
        {"name": f"{letter}_marker", "type": "regression", "column": "marker_level"},
        {"name": f"{letter}_pfs", "type": "survival", "time": "pfs_days", "event": "pfs_event", "time_unit": "days"},
    ]
    own_genes = programs[f"specific_{letter}"]
    truth = {
        f"{letter}_response": programs["shared_1"] + own_genes,
        f"{letter}_marker": programs["shared_2"] + own_genes,
        f"{letter}_pfs": list(programs["shared_3"]),
    }
    return obs, truth, tasks
