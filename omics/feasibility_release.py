"""Release rules for feasibility counts: small cells shown as ``<k``, complementary suppression, and
optional Laplace noise, for the total and (when the operator may see them) each member's counts.

A count below ``data.min_cell_count`` (zero included) is shown as ``<k`` (primary suppression). Then,
since the funnel, the relaxation rows and the strata margins are tied by identities (the last
criterion's gain is the last drop of the funnel; every stratification adds up to the eligible count
and to its coarser margins; the total is the sum of the members), further cells are withheld, shown as
``*`` (complementary suppression), until no withheld count can be recovered: first no identity is left
with a single withheld cell, then an audit solves, for every withheld cell, the smallest and largest
integer value it can take given everything released, the identities, the funnel's inequalities and
what ``<k`` and ``*`` say (``0..k-1`` and ``>= k``), and withholds more until none is pinned.

With ``noise_epsilon`` each released table gets Laplace noise of scale ``sensitivity / epsilon``
(scipy.stats.laplace), the sensitivity being the most one patient changes the vector in L1
(``1 + criteria + stratifications``), rounded and clipped at 0, as i2b2/SHRINE and TriNetX
obfuscate counts; suppression then runs on the noisy counts (the identities no longer hold exactly, so
the exact audit is not run: a subtraction can only give a noisy value).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse, stats
from scipy.optimize import Bounds, LinearConstraint, milp

from omics.feasibility import FeasibilityLayout

log = logging.getLogger(__name__)

TOTAL = "total"
WITHHELD = "*"


@dataclass(frozen=True)
class ReleasedTable:
    """One released count vector: ``values`` (-1 where withheld), what each cell shows, and why."""

    values: np.ndarray
    shown: tuple[str, ...]
    small: np.ndarray  # below the minimum cell count: shown as '<k'
    withheld: np.ndarray  # withheld so a small cell cannot be recovered: shown as '*'

    def to_json(self) -> list[int | str]:
        return [int(v) if s.isdigit() else s for v, s in zip(self.values, self.shown, strict=True)]


@dataclass(frozen=True)
class FeasibilityRelease:
    total: ReleasedTable
    members: dict[str, ReleasedTable] = field(default_factory=dict)
    min_cell_count: int = 5
    noise: dict | None = None

    def statement(self) -> str:
        """The release rule in words, for the report."""
        text = (
            f"Counts below {self.min_cell_count} are shown as <{self.min_cell_count}; cells marked {WITHHELD} are "
            "withheld so that no small count can be recovered by subtraction from totals or other rows."
        )
        if self.noise:
            text += (
                f" Laplace noise (epsilon {self.noise['epsilon']:g} per table, sensitivity "
                f"{self.noise['sensitivity']}, scale {self.noise['scale']:.3g}) was added before release."
            )
        return text


def release_json(release: FeasibilityRelease, layout: FeasibilityLayout) -> dict:
    """The release as ``feasibility.json`` rows: each cell's description with what the total and each
    member show (an integer, ``<k`` or ``*``), the rule in words and the noise, if any."""
    rows = []
    for index, cell in enumerate(layout.cells):
        row = {**cell.describe(), TOTAL: release.total.to_json()[index]}
        if release.members:
            row["members"] = {name: table.to_json()[index] for name, table in release.members.items()}
        rows.append(row)
    return {
        "min_cell_count": release.min_cell_count,
        "noise": release.noise,
        "release_rule": release.statement(),
        "layout_digest": layout.digest(),
        "cells": rows,
    }


def noise_sensitivity(layout: FeasibilityLayout) -> int:
    """The most one patient changes the count vector in L1: an eligible patient adds 1 to screened, to
    every funnel row and to one cell of each stratification, and to no gain; a patient who fails exactly
    one criterion adds to one gain and to fewer funnel rows and no stratum; any other patient, less."""
    criteria = len(layout.section("relaxation"))
    stratifications = {cell.columns for cell in layout.cells if cell.section == "stratum"}
    return 1 + criteria + len(stratifications)


def add_laplace_noise(counts: np.ndarray, layout: FeasibilityLayout, *, epsilon: float, seed: int) -> np.ndarray:
    """``counts`` plus Laplace noise of scale sensitivity/epsilon, rounded and clipped at 0."""
    scale = noise_sensitivity(layout) / epsilon
    noise = stats.laplace.rvs(scale=scale, size=len(counts), random_state=np.random.default_rng(seed))
    return np.clip(np.rint(np.asarray(counts, dtype=float) + noise), 0, None).astype(np.int64)


def release_feasibility(
    total: np.ndarray,
    layout: FeasibilityLayout,
    *,
    min_cell_count: int,
    members: Mapping[str, np.ndarray] | None = None,
    noise_epsilon: float | None = None,
    seed: int = 0,
) -> FeasibilityRelease:
    """Release the summed counts (and each member's, when given) under the small-cell rule.

    ``total`` and each member's vector are aligned with ``layout``; without noise the total must be the
    members' sum. Suppression is decided jointly, so no member's withheld cell can be recovered from the
    total and the other members either.
    """
    members = dict(members or {})
    names = [TOTAL, *members]
    tables = np.array([total, *members.values()], dtype=np.int64).reshape(len(names), len(layout))
    noise = None
    if noise_epsilon is not None:
        tables = np.array(
            [add_laplace_noise(t, layout, epsilon=noise_epsilon, seed=seed + i) for i, t in enumerate(tables)]
        )
        sensitivity = noise_sensitivity(layout)
        noise = {"mechanism": "laplace", "epsilon": noise_epsilon, "sensitivity": sensitivity}
        noise["scale"] = sensitivity / noise_epsilon
    elif members and not np.array_equal(tables[0], tables[1:].sum(axis=0)):
        raise ValueError("release_feasibility: the total is not the sum of the members' counts")
    small, withheld = suppression_pattern(tables, layout, min_cell_count=min_cell_count, audit=noise is None)
    released = {name: _table(tables[i], small[i], withheld[i], min_cell_count) for i, name in enumerate(names)}
    log.info("feasibility release: %d small and %d withheld cell(s) of %d", small.sum(), withheld.sum(), small.size)
    return FeasibilityRelease(total=released.pop(TOTAL), members=released, min_cell_count=min_cell_count, noise=noise)


def suppression_pattern(
    tables: np.ndarray, layout: FeasibilityLayout, *, min_cell_count: int, audit: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(small, withheld) masks of shape ``tables.shape``; row 0 is the total, the other rows the members
    (the total is their sum). ``audit``: also run the integer audit (needs counts that keep the identities)."""
    tables = np.atleast_2d(np.asarray(tables, dtype=np.int64))
    flat = tables.ravel()
    small = flat < min_cell_count
    hidden = small.copy()
    relations = _relations(layout, n_tables=tables.shape[0])
    while True:
        _close_single_gaps(hidden, flat, relations)
        if not audit:
            break
        pinned = determined_cells(
            tables, small.reshape(tables.shape), hidden.reshape(tables.shape), layout, min_cell_count=min_cell_count
        )
        if not pinned:
            break
        touched: set[int] = set()
        for index in pinned:  # one withholding per identity a round: the next audit sees what it fixed
            if index not in touched:
                touched |= _withhold_near(index, hidden, flat, relations)
    return small.reshape(tables.shape), (hidden & ~small).reshape(tables.shape)


def determined_cells(
    tables: np.ndarray, small: np.ndarray, withheld: np.ndarray, layout: FeasibilityLayout, *, min_cell_count: int
) -> list[int]:
    """Flat indices of hidden cells whose value a reader can pin down exactly from what is released (the
    integer minimum equals the maximum), given the identities, inequalities and what the marks say.

    ``tables`` are the true counts: a solution that moves a hidden cell away from its true value proves it
    is not pinned, so a few solves with random objectives clear most cells at once, and only the rest get
    their own minimum and maximum.
    """
    tables = np.atleast_2d(tables)
    flat, small, hidden = tables.ravel(), np.ravel(small), np.ravel(small) | np.ravel(withheld)
    if not hidden.any():
        return []
    relations = _relations(layout, n_tables=tables.shape[0], with_inequalities=True)
    matrix = sparse.lil_matrix((len(relations), flat.size))
    for r, (coefficients, _) in enumerate(relations):
        for index, coefficient in coefficients.items():
            matrix[r, index] = coefficient
    lower = np.array([0.0 if is_equality else -np.inf for _, is_equality in relations])
    constraint = LinearConstraint(matrix.tocsr(), lower, np.zeros(len(relations)))
    ceiling = 2.0 * flat.max() + min_cell_count  # above every true count: it pins nothing, keeps solves bounded
    low = np.where(hidden, np.where(small, 0.0, min_cell_count), flat).astype(float)
    high = np.where(hidden, np.where(small, min_cell_count - 1.0, ceiling), flat).astype(float)

    def solve(objective: np.ndarray):
        result = milp(objective, constraints=constraint, bounds=Bounds(low, high), integrality=np.ones(flat.size))
        if result.status != 0:
            raise RuntimeError(f"feasibility audit: the released counts are inconsistent ({result.message})")
        return np.rint(result.x)

    undecided = np.flatnonzero(hidden)
    rng = np.random.default_rng(0)
    for _ in range(4):
        if undecided.size == 0:
            break
        weights = np.zeros(flat.size)
        weights[undecided] = rng.choice([-1.0, 1.0], undecided.size) * rng.uniform(0.5, 1.5, undecided.size)
        undecided = undecided[solve(weights)[undecided] == flat[undecided]]
    pinned = []
    for index in undecided:
        objective = np.zeros(flat.size)
        objective[index] = 1.0
        if solve(-objective)[index] == flat[index] and solve(objective)[index] == flat[index]:
            pinned.append(int(index))
    return pinned


def _relations(
    layout: FeasibilityLayout, *, n_tables: int, with_inequalities: bool = False
) -> list[tuple[dict[int, int], bool]] | list[dict[int, int]]:
    size = len(layout)
    found: list[tuple[dict[int, int], bool]] = []
    for t in range(n_tables):
        found += [({t * size + i: c for i, c in eq.items()}, True) for eq in layout.equalities]
        if with_inequalities:
            found += [({t * size + i: c for i, c in iq.items()}, False) for iq in layout.inequalities]
    if n_tables > 1:  # the total is the members' sum, cell by cell
        for i in range(size):
            found.append(({i: 1, **{t * size + i: -1 for t in range(1, n_tables)}}, True))
    return found if with_inequalities else [coefficients for coefficients, _ in found]


def _close_single_gaps(hidden: np.ndarray, flat: np.ndarray, relations: list[dict[int, int]]) -> None:
    """Withhold the smallest released cell of every identity that holds a single hidden cell."""
    changed = True
    while changed:
        changed = False
        for relation in relations:
            members = list(relation)
            if sum(hidden[i] for i in members) == 1:
                shown = [i for i in members if not hidden[i]]
                hidden[min(shown, key=lambda i: (flat[i], i))] = True
                changed = True


def _withhold_near(index: int, hidden: np.ndarray, flat: np.ndarray, relations: list[dict[int, int]]) -> set[int]:
    """Withhold the smallest released cell that shares an identity with ``index`` (or, failing that, with
    a hidden cell of such an identity; or any released cell)."""
    near = [r for r in relations if index in r]
    for candidates in (
        {i for r in near for i in r},
        {i for r in relations if any(hidden[j] and j in r for s in near for j in s) for i in r},
        set(range(flat.size)),
    ):
        shown = [i for i in candidates if not hidden[i]]
        if shown:
            chosen = min(shown, key=lambda i: (flat[i], i))
            hidden[chosen] = True
            return {i for r in relations if chosen in r or index in r for i in r}
    raise RuntimeError("feasibility release: every cell is withheld and a count is still determined")


def _table(values: np.ndarray, small: np.ndarray, withheld: np.ndarray, k: int) -> ReleasedTable:
    shown = tuple(
        f"<{k}" if s else WITHHELD if w else str(int(v)) for v, s, w in zip(values, small, withheld, strict=True)
    )
    released = np.where(small | withheld, -1, values).astype(np.int64)
    return ReleasedTable(values=released, shown=shown, small=small.copy(), withheld=withheld.copy())
