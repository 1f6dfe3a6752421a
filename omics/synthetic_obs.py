"""What the clinical synthetic consortia (:mod:`omics.synthetic_trial`, :mod:`omics.synthetic_sites`) share:
members that hold obs columns only (an AnnData with zero var columns), their seeded split, and the
``panel.clinical`` declaration of the columns the model takes as inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from omics.io import write_member
from omics.split import assign_split


@dataclass
class ClinicalMember:
    """One written member: its name, organisation, file, tasks and size; ``current``: the file of the
    patients or candidate sites it scores with ``consortium score`` (no endpoints)."""

    name: str
    org: str
    path: Path
    tasks: list[dict[str, str]]
    n_samples: int
    current: Path | None = None
    region: str | None = None


@dataclass
class ClinicalConsortium:
    """A clinical-only synthetic consortium: members, the ``panel.clinical`` entries and the truth."""

    kind: str
    members: list[ClinicalMember]
    clinical: list[dict[str, Any]]
    ground_truth_path: Path
    truth: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberDraw:
    """One member to write: its position, letter (``a``, ``b``...), name, mix and its own random stream."""

    index: int
    letter: str
    name: str
    mix: dict[str, Any]
    rng: np.random.Generator


def member_draws(
    out: Path, sizes: Sequence[int], *, seed: int, prefix: str, mixes: Sequence[dict[str, Any]], unit: str
) -> Iterator[tuple[MemberDraw, int]]:
    """Check ``sizes`` (at least one member, each of >= 100 ``unit``), create ``out`` and yield each member's
    draw with its size: named ``<prefix>-<letter>``, the mixes in turn, the stream ``default_rng([seed, i])``."""
    if len(sizes) < 1 or min(sizes) < 100:
        raise ValueError(f"sizes must give at least one member of >= 100 {unit}, got {list(sizes)}")
    Path(out).mkdir(parents=True, exist_ok=True)
    for index, n in enumerate(sizes):
        letter = chr(ord("a") + index)
        rng = np.random.default_rng([seed, index])
        yield MemberDraw(index, letter, f"{prefix}-{letter}", mixes[index % len(mixes)], rng), n


def write_current(obs: pd.DataFrame, out: Path, draw: MemberDraw, *, suffix: str) -> tuple[Path, ad.AnnData]:
    """Write the samples ``draw``'s member scores (no endpoints) to ``<name>.current.h5ad``, ids
    ``<letter>-<suffix>-NNNNN``."""
    path = Path(out) / f"{draw.name}.current.h5ad"
    current = obs_only(obs, prefix=f"{draw.letter}-{suffix}")
    current.write_h5ad(path)
    return path, current


def write_truth(out: Path, truth: dict[str, Any]) -> Path:
    """``ground_truth.json`` in ``out``."""
    path = Path(out) / "ground_truth.json"
    path.write_text(json.dumps(truth, indent=1))
    return path


class _TaskView:
    """Attribute access to a task mapping, the shape the split code reads."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.__dict__.update(mapping)


def obs_only(obs: pd.DataFrame, *, prefix: str) -> ad.AnnData:
    """An AnnData holding ``obs`` and no feature column (a clinical-only member)."""
    obs = obs.copy()
    obs.index = [f"{prefix}-{i:05d}" for i in range(len(obs))]
    return ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs, var=pd.DataFrame(index=[]))


def write_obs_member(
    obs: pd.DataFrame,
    path: Path,
    *,
    prefix: str,
    tasks: Sequence[dict[str, str]],
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> ad.AnnData:
    """Write a member with a stratified, seeded split (``obs['split']``); return what was written."""
    adata = obs_only(obs, prefix=prefix)
    assign_split(
        adata, tasks=[_TaskView(t) for t in tasks], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    write_member(adata, path)
    return adata


def categorical(values: Sequence[str] | np.ndarray, levels: Sequence[str]) -> pd.Categorical:
    """A categorical with declared levels (missing values stay missing)."""
    return pd.Categorical(values, categories=list(levels))


def with_missing(rng: np.random.Generator, values: np.ndarray, fraction: float) -> np.ndarray:
    """``values`` as floats with a random ``fraction`` set to NaN."""
    out = np.asarray(values, dtype=np.float64).copy()
    out[rng.random(out.size) < fraction] = np.nan
    return out


def standardized(values: np.ndarray, *, center: float, scale: float) -> np.ndarray:
    """``(values - center) / scale``, NaN read as the center (a missing value carries no planted effect)."""
    z = (np.asarray(values, dtype=np.float64) - center) / scale
    return np.where(np.isnan(z), 0.0, z)
