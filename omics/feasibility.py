"""Site-side feasibility counts of a protocol: the attrition funnel, each criterion's relaxation gain and
the eligible patients by declared strata, as one flat vector of integers the server can sum.

The vector's layout depends only on the protocol (:func:`feasibility_layout`), never on a member's data,
so every member sends the same cells in the same order and the server adds them (under HE when it is
on). The layout also lists the linear identities and inequalities that hold between the cells; the
release rules (:mod:`omics.feasibility_release`) use them to make sure no suppressed count can be
recovered by subtraction.

A protocol's tree is walked node by node with whitelisted numpy comparisons; nothing is evaluated as
code. Missing values follow three-valued logic (see :mod:`schema.protocol`).

>>> import pandas as pd
>>> from schema.protocol import Protocol
>>> p = Protocol.model_validate({"columns": {"age": "numeric"},
...     "inclusion": [{"name": "adult", "where": "age >= 18"}, {"name": "young", "where": "age < 60"}]})
>>> counts = count_feasibility(pd.DataFrame({"age": [10, 20, 30, 70]}), p)
>>> [(c.label, int(v)) for c, v in zip(feasibility_layout(p).cells, counts)]
[('screened', 4), ('after adult', 3), ('after young', 2), ('without adult', 1), ('without young', 1)]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from schema.protocol import NUMERIC, Protocol, ProtocolError
from schema.protocol_grammar import AllOf, AnyOf, Between, Compare, Leaf, Missing, Node, Not, leaves, level_text

log = logging.getLogger(__name__)

_COMPARE = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class CountCell:
    """One cell of the count vector.

    ``section`` is ``funnel`` (patients left after ``criterion``; the first cell, ``screened``, has none),
    ``relaxation`` (patients gained if ``criterion`` alone were dropped) or ``stratum`` (eligible patients
    whose ``columns`` take ``levels``).
    """

    section: Literal["funnel", "relaxation", "stratum"]
    label: str
    criterion: str | None = None
    columns: tuple[str, ...] = ()
    levels: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v not in (None, ())}


@dataclass(frozen=True)
class FeasibilityLayout:
    """The cells of the count vector and the relations between them.

    ``equalities``: each a mapping cell index -> coefficient whose weighted sum is 0 for every true
    vector (and for every sum of members' vectors). ``inequalities``: weighted sums that are <= 0.
    Every cell is >= 0.
    """

    cells: tuple[CountCell, ...]
    equalities: tuple[dict[int, int], ...] = field(default=())
    inequalities: tuple[dict[int, int], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.cells)

    def describe(self) -> list[dict]:
        """The layout as JSON-ready rows, one a cell, in vector order."""
        return [cell.describe() for cell in self.cells]

    def section(self, name: str) -> list[int]:
        return [i for i, cell in enumerate(self.cells) if cell.section == name]

    def digest(self) -> str:
        """A short fingerprint of the cells, to check that every member counted the same protocol."""
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def feasibility_layout(protocol: Protocol) -> FeasibilityLayout:
    """The count vector's cells for ``protocol``: the funnel (``screened``, then after each criterion in
    order), each criterion's relaxation gain, then every cell of every declared stratification."""
    names = [c.name for _, c in protocol.criteria]
    n = len(names)
    cells = [CountCell("funnel", "screened")]
    cells += [CountCell("funnel", f"after {name}", criterion=name) for name in names]
    cells += [CountCell("relaxation", f"without {name}", criterion=name) for name in names]
    strata_cells: dict[tuple[str, ...], dict[tuple[str, ...], int]] = {}
    for columns in protocol.strata:
        key = tuple(columns)
        strata_cells[key] = {}
        for levels in itertools.product(*(protocol.stratum_levels(c) for c in columns)):
            strata_cells[key][levels] = len(cells)
            label = ", ".join(f"{c}={v}" for c, v in zip(columns, levels, strict=True))
            cells.append(CountCell("stratum", label, columns=key, levels=levels))
    eligible = n  # the index of the last funnel cell
    equalities = [{1 + n + n - 1: 1, eligible: 1, eligible - 1: -1}]  # the last gain is the last drop
    inequalities = [{i: 1, i - 1: -1} for i in range(1, n + 1)]
    inequalities += [{eligible: 1, 1 + n + i: 1, i: -1} for i in range(n)]  # eligible + gain_i <= after_(i-1)
    for key, by_levels in strata_cells.items():
        equalities.append({**dict.fromkeys(by_levels.values(), 1), eligible: -1})
        for smaller, small_cells in strata_cells.items():
            if set(smaller) < set(key):
                positions = [key.index(c) for c in smaller]
                for levels, index in small_cells.items():
                    parts = {i: 1 for lv, i in by_levels.items() if tuple(lv[p] for p in positions) == levels}
                    equalities.append({**parts, index: -1})
    return FeasibilityLayout(tuple(cells), tuple(equalities), tuple(inequalities))


def check_obs(obs: pd.DataFrame, protocol: Protocol, *, path: str = "") -> None:
    """Check that ``obs`` holds every column the protocol uses, numeric where declared numeric and with
    no level the protocol does not declare; :class:`ProtocolError` names the column and the fix."""
    where = path or "member data"
    for column in _used_columns(protocol):
        if column not in obs.columns:
            raise ProtocolError(
                f"{where}: the protocol names column {column!r}, which is not in obs (columns: "
                f"{sorted(map(str, obs.columns))[:20]}); fix the protocol or rename the member's column"
            )
        values = obs[column]
        levels = protocol.levels(column)
        if levels is None:
            if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
                raise ProtocolError(
                    f"{where}: obs column {column!r} is declared numeric in the protocol but holds "
                    f"{values.dtype} values; store numbers or declare its levels"
                )
            continue
        found = {level_text(v) for v in values[values.notna()].unique()}
        unknown = sorted(found - set(levels))
        if unknown:
            raise ProtocolError(
                f"{where}: obs column {column!r} holds level(s) {unknown[:10]} that the protocol does not declare "
                f"(declared: {levels}); add them to the protocol's columns.{column} or recode the member's data"
            )


def criterion_passes(obs: pd.DataFrame, protocol: Protocol, *, path: str = "") -> dict[str, np.ndarray]:
    """For each criterion, in funnel order, which patients pass it: an inclusion criterion that is true,
    an exclusion criterion that is false (an unknown result passes neither)."""
    check_obs(obs, protocol, path=path)
    passes = {}
    for kind, criterion in protocol.criteria:
        true, false = _truth(criterion.condition, obs, protocol)
        passes[criterion.name] = true if kind == "inclusion" else false
    return passes


def count_feasibility(obs: pd.DataFrame, protocol: Protocol, *, path: str = "") -> np.ndarray:
    """The member's count vector (int64), aligned with :func:`feasibility_layout` of ``protocol``."""
    passes = list(criterion_passes(obs, protocol, path=path).values())
    n_rows = len(obs)
    left = np.ones(n_rows, dtype=bool)
    funnel = [n_rows]
    for mask in passes:
        left &= mask
        funnel.append(int(left.sum()))
    eligible = left
    gains = []
    for skip in range(len(passes)):
        others = np.ones(n_rows, dtype=bool)
        for i, mask in enumerate(passes):
            if i != skip:
                others &= mask
        gains.append(int(others.sum()) - funnel[-1])
    strata = [_stratum_counts(obs, protocol, columns, eligible) for columns in protocol.strata]
    vector = np.concatenate([np.array(funnel + gains, dtype=np.int64), *strata]).astype(np.int64)
    log.info("feasibility: %d screened, %d eligible", n_rows, funnel[-1])
    return vector


def _used_columns(protocol: Protocol) -> list[str]:
    used = [leaf.column for _, c in protocol.criteria for leaf in leaves(c.condition)]
    used += [column for columns in protocol.strata for column in columns]
    return list(dict.fromkeys(used))


def _stratum_counts(obs: pd.DataFrame, protocol: Protocol, columns: list[str], eligible: np.ndarray) -> np.ndarray:
    codes, shape = [], []
    for column in columns:
        levels = protocol.stratum_levels(column)
        values = obs[column]
        missing = values.isna().to_numpy()
        if protocol.levels(column) is None:
            numbers = pd.to_numeric(values).to_numpy(dtype=float)
            code = np.searchsorted(np.asarray(protocol.bands[column], dtype=float), numbers, side="right")
        else:
            position = {level: i for i, level in enumerate(levels)}
            code = np.array([position.get(level_text(v), 0) for v in values], dtype=np.int64)
        codes.append(np.where(missing, len(levels) - 1, code))
        shape.append(len(levels))
    flat = np.ravel_multi_index(tuple(c[eligible] for c in codes), tuple(shape))
    return np.bincount(flat, minlength=int(np.prod(shape))).astype(np.int64)


def _truth(node: Node, obs: pd.DataFrame, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(true, false) masks of a condition under three-valued logic; neither where the result is unknown."""
    if isinstance(node, AllOf | AnyOf):
        parts = [_truth(item, obs, protocol) for item in node.items]
        trues, falses = np.array([p[0] for p in parts]), np.array([p[1] for p in parts])
        if isinstance(node, AllOf):
            return trues.all(axis=0), falses.any(axis=0)
        return trues.any(axis=0), falses.all(axis=0)
    if isinstance(node, Not):
        true, false = _truth(node.item, obs, protocol)
        return false, true
    return _leaf_truth(node, obs, protocol)


def _leaf_truth(leaf: Leaf, obs: pd.DataFrame, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    values = obs[leaf.column]
    missing = values.isna().to_numpy()
    if isinstance(leaf, Missing):
        result = ~missing if leaf.negate else missing
        return result, ~result
    if protocol.columns[leaf.column] == NUMERIC:
        data = pd.to_numeric(values).to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            if isinstance(leaf, Compare):
                result = _COMPARE[leaf.op](data, float(leaf.value))
            elif isinstance(leaf, Between):
                result = (data >= leaf.low) & (data <= leaf.high)
            else:
                result = np.isin(data, np.asarray(leaf.values, dtype=float)) ^ leaf.negate
    else:
        text = np.array([level_text(v) for v in values], dtype=object)
        if isinstance(leaf, Compare):
            result = _COMPARE[leaf.op](text, level_text(leaf.value))
        else:
            result = np.isin(text, [level_text(v) for v in leaf.values]) ^ leaf.negate
    result = np.asarray(result, dtype=bool)
    return result & ~missing, ~result & ~missing


def scenario_fractions(counts: np.ndarray, layout: FeasibilityLayout) -> dict[str, float | None]:
    """Eligible share of screened patients for the protocol and for each one-criterion relaxation
    (``without <criterion>``): the enrollment scenarios. ``counts`` is a released vector (a member's or
    the total, -1 where withheld): a scenario that needs a withheld cell is ``None``, since a forecast
    from it would let a reader work the withheld count back out.

    >>> layout = FeasibilityLayout((CountCell("funnel", "screened"), CountCell("funnel", "after a", "a"),
    ...     CountCell("relaxation", "without a", "a")))
    >>> scenario_fractions(np.array([10, 4, 6]), layout), scenario_fractions(np.array([10, -1, -1]), layout)
    ({'protocol': 0.4, 'without a': 1.0}, {'protocol': None, 'without a': None})
    """
    funnel, gains = layout.section("funnel"), layout.section("relaxation")
    screened, eligible = int(counts[funnel[0]]), int(counts[funnel[-1]])

    def share(*parts: int) -> float | None:
        if screened <= 0 or min(parts) < 0:
            return None
        return min(1.0, sum(parts) / screened)  # noisy counts may not keep eligible <= screened

    fractions = {"protocol": share(eligible)}
    fractions.update({layout.cells[i].label: share(eligible, int(counts[i])) for i in gains})
    return fractions


def round_summed_counts(summed: np.ndarray, *, tolerance: float = 0.05) -> np.ndarray:
    """Counts from a sum decrypted from CKKS (reals close to integers): rounded, or an error if a value is
    further than ``tolerance`` from an integer (the sum was not of count vectors, or the scale is too small).

    >>> round_summed_counts(np.array([3.0000001, 11.99999]))
    array([ 3, 12])
    """
    summed = np.asarray(summed, dtype=float)
    rounded = np.rint(summed)
    off = np.abs(summed - rounded)
    if off.size and off.max() > tolerance:
        raise ValueError(
            f"feasibility sum: cell {int(off.argmax())} is {summed[off.argmax()]:.4f}, not a count; "
            "check that every member sent the same layout and the HE scale"
        )
    return rounded.astype(np.int64)
