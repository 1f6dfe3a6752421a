"""The numeric input of the models layer: a member's samples as plain numpy arrays.

The omics layer turns an AnnData file into the keyword arguments of :class:`MemberData`
(``omics.member_arrays``); the models layer never sees AnnData.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

TaskKind = Literal["binary", "regression", "survival"]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """A task head: its unique name, its kind and its weight in the member's loss."""

    name: str
    kind: TaskKind
    weight: float = 1.0


@dataclass
class MemberData:
    """One member's samples.

    Attributes
    ----------
    X
        ``(n_samples, n_features)`` float32, already normalized, in consortium panel order.
    targets
        Per task name: ``(n,)`` float for binary (0/1) and regression tasks, ``(n, 2)`` float
        ``[time, event]`` for survival tasks. ``NaN`` marks a missing label (masked, never imputed).
    split
        ``(n,)`` strings, each one of ``"train"``, ``"val"``, ``"test"``.
    feature_names
        The panel's feature identifiers, ``len == n_features``.
    """

    X: np.ndarray
    targets: dict[str, np.ndarray]
    split: np.ndarray
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        n = self.X.shape[0]
        self.split = np.asarray(self.split).astype(str)
        if self.split.shape != (n,):
            raise ValueError(f"split has shape {self.split.shape}, expected ({n},)")
        bad = sorted(set(self.split) - set(SPLITS))
        if bad:
            raise ValueError(f"split holds unknown values {bad}; use 'train', 'val' or 'test'")
        for name, y in self.targets.items():
            if y.shape[0] != n:
                raise ValueError(f"target '{name}' has {y.shape[0]} rows, X has {n}")
        if self.feature_names and len(self.feature_names) != self.X.shape[1]:
            raise ValueError(f"{len(self.feature_names)} feature names for {self.X.shape[1]} features")

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def subset(self, part: str) -> MemberData:
        """The samples of one split (``"train"``, ``"val"`` or ``"test"``)."""
        rows = self.split == part
        return MemberData(
            X=self.X[rows],
            targets={k: v[rows] for k, v in self.targets.items()},
            split=self.split[rows],
            feature_names=self.feature_names,
        )


def pool_members(members: Mapping[str, MemberData], tasks: Sequence[TaskSpec]) -> MemberData:
    """Concatenate members' samples; a task's labels are NaN on the rows of members that lack it."""
    parts = list(members.values())
    if not parts:
        raise ValueError("no members to pool")
    n_features = {p.n_features for p in parts}
    if len(n_features) != 1:
        raise ValueError(f"members disagree on the number of features: {sorted(n_features)}")
    targets: dict[str, np.ndarray] = {}
    for task in tasks:
        width = (2,) if task.kind == "survival" else ()
        columns = [
            p.targets[task.name] if task.name in p.targets else np.full((p.X.shape[0], *width), np.nan) for p in parts
        ]
        targets[task.name] = np.concatenate(columns).astype(np.float64)
    return MemberData(
        X=np.concatenate([p.X for p in parts]),
        targets=targets,
        split=np.concatenate([p.split for p in parts]),
        feature_names=parts[0].feature_names,
    )
