"""The numeric input of the models layer: a member's samples as plain numpy arrays.

The omics layer turns an AnnData file into the keyword arguments of :class:`MemberData`
(``omics.member_arrays``); the models layer never sees AnnData.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import scipy.sparse as sp

TaskKind = Literal["binary", "regression", "survival"]
SPLITS = ("train", "val", "test")
ROW_BLOCK = 4096  # rows ScaledRows makes dense at a time (predictions, attribution means)
_SCALED_VALUES = 2**22  # values ScaledRows reads and scales at a time into the rows it returns


@dataclass(frozen=True)
class TaskSpec:
    """A task head: its name, its kind, its weight in the member's loss, and whether it is shared.

    Attributes
    ----------
    name
        The endpoint's name; unique among a member's tasks and the key part ``heads.<name>.``.
    kind
        ``"binary"``, ``"regression"`` or ``"survival"``.
    weight
        Weight of the task's loss in the member's multitask loss.
    shared
        ``True`` for an endpoint that several members hold under the same name and kind: its head's
        parameters are aggregated across them like the trunk (see
        :meth:`models.network.MultitaskNet.shared_state`). ``False`` (a private endpoint): the head
        never leaves its member. Keyword-only.
    """

    name: str
    kind: TaskKind
    weight: float = 1.0
    shared: bool = field(default=False, kw_only=True)


class ScaledRows:
    """Rows of a matrix of log values, centred and scaled per feature only when rows are read.

    A single-cell member's matrix stays in CSR form: ``(x - mean) / std`` clipped to
    ``[-max_value, max_value]`` (:func:`omics.normalize.scale_features`'s arithmetic) is dense by nature,
    so it is built for the rows a minibatch, a prediction block or an attribution block reads, never for
    the whole matrix. A member too large for memory gives a row reader instead (``omics.chunked``: an
    object with ``reads_rows``, ``shape`` and ``blocks()``, indexed by rows to give CSR float32 rows), read
    the same way. A dense member's float32 log values are read the same way, so that a member site
    holds one matrix for its statistics (the log values) and its network (their scaled rows), not two.
    Indexing with rows gives another :class:`ScaledRows` over the same matrix (a view);
    :meth:`dense` gives the scaled float32 rows; ``np.asarray`` gives all of them (small data only).

    >>> rows = ScaledRows(sp.csr_matrix(np.array([[0.0, 2.0], [4.0, 0.0]])), mean=[2.0, 1.0], std=[2.0, 1.0])
    >>> rows.dense().tolist()
    [[-1.0, 1.0], [1.0, -1.0]]
    >>> rows[np.array([False, True])].dense().tolist()
    [[1.0, -1.0]]
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, matrix, *, mean, std, max_value: float = 10.0, rows: np.ndarray | None = None) -> None:
        if isinstance(matrix, np.ndarray):  # dense log values: read in place (a float32 array is not copied)
            self.matrix = np.asarray(matrix, dtype=np.float32)
        elif getattr(matrix, "reads_rows", False):  # read from a file: rows (index arrays) come back as CSR
            self.matrix = matrix
        else:
            matrix = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
            self.matrix = matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)
        p = self.matrix.shape[1]
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        std = np.asarray(std, dtype=np.float32).reshape(-1)
        if self.mean.shape != (p,) or std.shape != (p,):
            raise ValueError(f"mean and std need one value per feature ({p}), got {self.mean.shape} and {std.shape}")
        self.scale = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)
        self.max_value = float(max_value)
        self.rows = np.arange(self.matrix.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows.size), int(self.matrix.shape[1]))

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, key) -> ScaledRows:
        return ScaledRows(self.matrix, mean=self.mean, std=self.scale, max_value=self.max_value, rows=self.rows[key])

    def dense(self, positions=None) -> np.ndarray:
        """The scaled float32 rows at ``positions`` (default: all rows of this view)."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions)]
        out = np.empty((rows.size, self.matrix.shape[1]), dtype=np.float32)
        step = max(1, _SCALED_VALUES // max(1, self.matrix.shape[1]))
        for start in range(0, rows.size, step):  # the same float32 arithmetic, in place, a few rows at a time
            block = self.matrix[rows[start : start + step]]
            part = out[start : start + step]
            np.subtract(block if isinstance(block, np.ndarray) else block.toarray(), self.mean, out=part)
            np.divide(part, self.scale, out=part)
            np.clip(part, -self.max_value, self.max_value, out=part)
        return out

    def blocks(self, size: int | None = None) -> Iterator[np.ndarray]:
        """The scaled rows, ``size`` (default :data:`ROW_BLOCK`) at a time."""
        size = ROW_BLOCK if size is None else int(size)
        for start in range(0, len(self), size):
            yield self.dense(np.arange(start, min(start + size, len(self))))

    def nonfinite(self) -> int:
        """How many stored values (all rows, not only this view's) are NaN or infinite."""
        if isinstance(self.matrix, np.ndarray):  # a block of rows at a time: no matrix-sized mask
            blocks = (self.matrix[start : start + ROW_BLOCK] for start in range(0, self.matrix.shape[0], ROW_BLOCK))
            return sum(int((~np.isfinite(block)).sum()) for block in blocks)
        if getattr(self.matrix, "reads_rows", False):  # one pass over the file
            return sum(int((~np.isfinite(part.data)).sum()) for _, part in self.matrix.blocks())
        return int((~np.isfinite(self.matrix.data)).sum())

    def all_finite(self) -> bool:
        return self.nonfinite() == 0

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.dense()
        return out if dtype is None else out.astype(dtype)


def dense_rows(X: np.ndarray | ScaledRows, positions=None) -> np.ndarray:
    """Float32 rows of ``X`` (a dense array or :class:`ScaledRows`) at ``positions`` (default: all)."""
    if isinstance(X, ScaledRows):
        return X.dense(positions)
    return np.asarray(X if positions is None else X[positions], dtype=np.float32)


def row_blocks(X: np.ndarray | ScaledRows, size: int | None = None) -> Iterator[np.ndarray]:
    """The float32 rows of ``X``, ``size`` (default :data:`ROW_BLOCK`) at a time (a sparse member's scaled
    rows built per block)."""
    size = ROW_BLOCK if size is None else int(size)
    if isinstance(X, ScaledRows):
        yield from X.blocks(size)
        return
    for start in range(0, X.shape[0], size):
        yield np.asarray(X[start : start + size], dtype=np.float32)


@dataclass
class MemberData:
    """One member's samples.

    Attributes
    ----------
    X
        ``(n_samples, n_features)`` float32, already normalized, in consortium panel order; or
        :class:`ScaledRows` (a member's log values, dense or in CSR form, scaled as rows are read).
    targets
        Per task name: ``(n,)`` float for binary (0/1) and regression tasks, ``(n, 2)`` float
        ``[time, event]`` for survival tasks. ``NaN`` marks a missing label (masked, never imputed).
    split
        ``(n,)`` strings, each one of ``"train"``, ``"val"``, ``"test"``.
    feature_names
        The panel's feature identifiers, ``len == n_features``.
    """

    X: np.ndarray | ScaledRows
    targets: dict[str, np.ndarray]
    split: np.ndarray
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.X, ScaledRows):
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

    @property
    def sparse(self) -> bool:
        """Whether ``X`` holds a CSR matrix or a row reader of one (a dense member's :class:`ScaledRows` read
        a dense one)."""
        return isinstance(self.X, ScaledRows) and not isinstance(self.X.matrix, np.ndarray)

    def subset(self, part: str) -> MemberData:
        """The samples of one split (``"train"``, ``"val"`` or ``"test"``); :class:`ScaledRows` are a view
        of the member's matrix, not a copy."""
        rows = self.split == part
        return MemberData(
            X=self.X[rows],
            targets={k: v[rows] for k, v in self.targets.items()},
            split=self.split[rows],
            feature_names=self.feature_names,
        )


TasksByMember: TypeAlias = Mapping[str, Sequence[TaskSpec]]


def merge_tasks(tasks_by_member: TasksByMember) -> list[TaskSpec]:
    """One :class:`TaskSpec` per endpoint name across members, in first-seen order.

    An endpoint held by two or more members comes back with ``shared=True`` and the mean of their
    weights; one held by a single member keeps its spec as given.

    Raises
    ------
    ValueError
        If two members hold the same endpoint name with different kinds (both members are named).
    """
    holders: dict[str, list[tuple[str, TaskSpec]]] = {}
    for member, tasks in tasks_by_member.items():
        for task in tasks:
            held = holders.setdefault(task.name, [])
            if any(holder == member for holder, _ in held):
                raise ValueError(f"member '{member}' lists task '{task.name}' twice; task names are unique per member")
            if held and held[0][1].kind != task.kind:
                first, spec = held[0]
                raise ValueError(
                    f"task '{task.name}' is {spec.kind} at member '{first}' but {task.kind} at member "
                    f"'{member}'; a shared endpoint needs one kind everywhere: rename one of them or "
                    "make the kinds agree"
                )
            held.append((member, task))
    merged = []
    for name, held in holders.items():
        if len(held) == 1:
            merged.append(held[0][1])
            continue
        weight = sum(task.weight for _, task in held) / len(held)
        merged.append(TaskSpec(name, held[0][1].kind, weight, shared=True))
    return merged


def pool_members(members: Mapping[str, MemberData], tasks: TasksByMember | Sequence[TaskSpec]) -> MemberData:
    """Concatenate members' samples (in ``members`` order) with one target per endpoint name.

    Parameters
    ----------
    members
        Member name -> its samples; all on the same feature panel.
    tasks
        Member name -> its tasks: a member contributes labels only to the endpoints it holds,
        members holding the same endpoint (same name and kind) share one target column, and the
        rows of members without it are ``NaN``. A flat sequence of tasks is also accepted: then
        every member that has targets under a task's name contributes them.

    Returns
    -------
    MemberData
        The pooled samples; ``targets`` has one entry per endpoint name (see :func:`merge_tasks`).

    Raises
    ------
    ValueError
        If members disagree on the feature panel, the same endpoint name has two kinds, or a
        member lacks targets for a task it holds.
    """
    parts = dict(members)
    if not parts:
        raise ValueError("no members to pool")
    n_features = {p.n_features for p in parts.values()}
    if len(n_features) != 1:
        raise ValueError(f"members disagree on the number of features: {sorted(n_features)}")
    named = {m: p.feature_names for m, p in parts.items() if p.feature_names}
    reference = next(iter(named.items()), None)
    for member, names in named.items():
        if reference is not None and list(names) != list(reference[1]):
            raise ValueError(
                f"members '{reference[0]}' and '{member}' have different feature names; harmonize both "
                "to the consortium panel before pooling"
            )
    if not isinstance(tasks, Mapping):
        tasks = _tasks_by_labels(parts, tasks)
    unknown = sorted(set(tasks) - set(parts))
    if unknown:
        raise ValueError(f"tasks name members {unknown} that are not in members {sorted(parts)}")
    endpoints = merge_tasks(tasks)
    held = {m: {t.name for t in tasks.get(m, ())} for m in parts}
    targets = {
        task.name: np.concatenate([_target_column(m, p, task, held=task.name in held[m]) for m, p in parts.items()])
        for task in endpoints
    }
    first = next(iter(parts.values()))
    return MemberData(
        X=np.concatenate([p.X for p in parts.values()]),
        targets=targets,
        split=np.concatenate([p.split for p in parts.values()]),
        feature_names=first.feature_names,
    )


def _tasks_by_labels(parts: Mapping[str, MemberData], tasks: Sequence[TaskSpec]) -> dict[str, list[TaskSpec]]:
    # a flat task list: each member holds the listed tasks it has targets for
    unique: dict[str, TaskSpec] = {}
    for task in tasks:
        seen = unique.setdefault(task.name, task)
        if seen.kind != task.kind:
            raise ValueError(
                f"task '{task.name}' is listed as {seen.kind} and as {task.kind}; give the tasks per member "
                "(a mapping) and make the kinds agree"
            )
    return {m: [t for t in unique.values() if t.name in p.targets] for m, p in parts.items()}


def _target_column(member: str, part: MemberData, task: TaskSpec, *, held: bool) -> np.ndarray:
    shape = (part.X.shape[0], 2) if task.kind == "survival" else (part.X.shape[0],)
    if not held:
        return np.full(shape, np.nan)
    if task.name not in part.targets:
        raise ValueError(
            f"member '{member}' holds task '{task.name}' but has no targets for it; it has {sorted(part.targets)}"
        )
    y = np.asarray(part.targets[task.name], dtype=np.float64)
    if y.shape != shape:
        raise ValueError(
            f"member '{member}': targets of {task.kind} task '{task.name}' have shape {y.shape}; expected {shape}"
        )
    return y
