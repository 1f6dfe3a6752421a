"""``protocol.yaml``: a trial protocol's ordered inclusion and exclusion criteria over obs columns.

Each criterion is named and holds a ``where`` in the small grammar of :mod:`schema.protocol_grammar`,
parsed into typed nodes and never evaluated as code. Every column a criterion or a stratum names is
declared under ``columns`` (``numeric``, or the list of its levels), so a protocol is checked whole
before a member reads it, and a member checks its obs against the same declaration. Strata are crosses
of declared categorical columns and banded numeric ones (``bands: {age: [40, 65]}``)::

    name: nsclc-phase2
    columns: {age: numeric, sex: [F, M], ecog: numeric, egfr: numeric, region: [EU, US]}
    inclusion:
      - {name: adult, where: "age between 18 and 75"}
      - {name: fit, where: "ecog in [0, 1]"}
    exclusion:
      - {name: renal, where: "egfr < 30"}
    bands: {age: [40, 65]}
    strata: [[age, sex], [region]]

The funnel runs the inclusion criteria in order, then the exclusion criteria in order.

>>> p = Protocol.model_validate({"columns": {"age": "numeric", "sex": ["F", "M"]},
...     "inclusion": [{"name": "adult", "where": "age >= 18"}], "bands": {"age": [65]},
...     "strata": [["age", "sex"]]})
>>> [c.name for _, c in p.criteria], p.stratum_levels("age")
(['adult'], ['<65', '>=65', 'missing'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schema.protocol_grammar import (
    Between,
    Compare,
    InList,
    Leaf,
    Node,
    ProtocolError,
    leaves,
    level_text,
    parse_condition,
)

__all__ = ["MISSING_LEVEL", "NUMERIC", "Criterion", "Protocol", "ProtocolError", "load_protocol", "protocol_from_text"]

NUMERIC = "numeric"
MISSING_LEVEL = "missing"
"""The stratum level of a patient whose value of a stratum column is missing (so every margin adds up)."""
_CRITERION_NAME = r"^[A-Za-z][A-Za-z0-9_ -]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Criterion(_Strict):
    """One named criterion; ``where`` is parsed on validation, and :attr:`condition` is its tree."""

    name: str = Field(pattern=_CRITERION_NAME, description="Shown in the funnel; letters, digits, ' ', '_', '-'.")
    where: str = Field(min_length=1, max_length=2000, description="The condition, in the protocol grammar.")
    description: str = ""

    @model_validator(mode="after")
    def _parses(self) -> Criterion:
        parse_condition(self.where, criterion=self.name)
        return self

    @property
    def condition(self) -> Node:
        return parse_condition(self.where, criterion=self.name)


class Protocol(_Strict):
    """A protocol: declared columns, ordered criteria and the strata to count eligible patients by."""

    name: str = "protocol"
    columns: dict[str, Literal["numeric"] | list[str | int | float | bool]] = Field(
        description="obs column -> 'numeric', or the list of its levels."
    )
    inclusion: list[Criterion] = Field(default_factory=list)
    exclusion: list[Criterion] = Field(default_factory=list)
    bands: dict[str, list[float]] = Field(
        default_factory=dict, description="numeric column -> increasing cut points of its stratum bands."
    )
    strata: list[list[str]] = Field(
        default_factory=list, description="Stratifications: each a list of columns whose levels are crossed."
    )

    @field_validator("columns")
    @classmethod
    def _declared_columns(cls, columns: dict) -> dict:
        normalized = {}
        for column, kind in columns.items():
            if not column or column.startswith("__"):
                raise ValueError(f"column {column!r}: give the obs column's name (dunder names are refused)")
            if kind == NUMERIC:
                normalized[column] = NUMERIC
                continue
            levels = [level_text(level) for level in kind]
            if not levels or len(set(levels)) != len(levels) or MISSING_LEVEL in levels:
                raise ValueError(
                    f"column {column!r}: levels {kind} must be one or more distinct values other than "
                    f"{MISSING_LEVEL!r}; for a number write 'numeric'"
                )
            normalized[column] = levels
        return normalized

    @property
    def criteria(self) -> list[tuple[Literal["inclusion", "exclusion"], Criterion]]:
        """The criteria in funnel order: the inclusion ones, then the exclusion ones."""
        return [("inclusion", c) for c in self.inclusion] + [("exclusion", c) for c in self.exclusion]

    def levels(self, column: str) -> list[str] | None:
        """A categorical column's declared levels; ``None`` for a numeric one."""
        kind = self.columns[column]
        return None if kind == NUMERIC else list(kind)

    def stratum_levels(self, column: str) -> list[str]:
        """The levels a stratum column is counted by: its levels or bands, then ``missing``."""
        levels = self.levels(column)
        if levels is None:
            cuts = [level_text(c) for c in self.bands[column]]
            levels = [f"<{cuts[0]}"] + [f"{a} to <{b}" for a, b in zip(cuts, cuts[1:], strict=False)]
            levels.append(f">={cuts[-1]}")
        return [*levels, MISSING_LEVEL]

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if not self.criteria:
            raise ValueError("a protocol needs at least one criterion under 'inclusion' or 'exclusion'")
        names = [c.name for _, c in self.criteria]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"criterion names {repeated} repeat; give each criterion its own name")
        for _, criterion in self.criteria:
            for leaf in leaves(criterion.condition):
                self._check_leaf(criterion.name, leaf)
        for column, cuts in self.bands.items():
            if self.columns.get(column) != NUMERIC:
                raise ValueError(f"bands.{column}: bands are for declared numeric columns; declare {column}: numeric")
            if not cuts or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
                raise ValueError(f"bands.{column} = {cuts}: give one or more increasing cut points")
        seen = set()
        for stratification in self.strata:
            if not stratification or len(set(stratification)) != len(stratification):
                raise ValueError(f"strata {stratification}: list one or more distinct columns")
            for column in stratification:
                if column not in self.columns:
                    raise ValueError(f"strata {stratification}: column {column!r} is not declared under 'columns'")
                if self.columns[column] == NUMERIC and column not in self.bands:
                    raise ValueError(
                        f"strata {stratification}: numeric column {column!r} needs bands (bands: {{{column}: [..]}})"
                    )
            key = frozenset(stratification)
            if key in seen:
                raise ValueError(f"strata {stratification}: the same columns are listed twice")
            seen.add(key)
        return self

    def _check_leaf(self, criterion: str, leaf: Leaf) -> None:
        where = f"criterion {criterion!r}"
        if leaf.column not in self.columns:
            raise ValueError(
                f"{where} names column {leaf.column!r}, which is not declared under 'columns' "
                f"(declared: {sorted(self.columns)}); declare it or fix the name"
            )
        levels = self.levels(leaf.column)
        values = [leaf.value] if isinstance(leaf, Compare) else leaf.values if isinstance(leaf, InList) else []
        if levels is None:
            bad = [v for v in values if isinstance(v, str | bool)]
            if bad:
                raise ValueError(f"{where}: column {leaf.column!r} is numeric; compare it with numbers, not {bad}")
            return
        if isinstance(leaf, Between) or (isinstance(leaf, Compare) and leaf.op not in ("==", "!=")):
            raise ValueError(
                f"{where}: column {leaf.column!r} is categorical (levels {levels}); use ==, !=, 'in' or 'is missing'"
            )
        unknown = [v for v in values if level_text(v) not in levels]
        if unknown:
            raise ValueError(
                f"{where} names level {unknown[0]!r} of column {leaf.column!r}, which is not among its declared "
                f"levels {levels}; fix the level or declare it"
            )


def protocol_from_text(text: str, *, source: str = "protocol.yaml") -> Protocol:
    """Parse a protocol's YAML text (``yaml.safe_load``: no tags, no objects); errors name ``source``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{source}: not valid YAML ({exc}); fix the syntax at the position shown") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{source}: expected a mapping with 'columns', 'inclusion' and 'exclusion'")
    try:
        return Protocol.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {exc.error_count()} invalid field(s)"]
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = f"unknown key {error['loc'][-1]!r}; remove it or fix its spelling"
            lines.append(f"  {field}: {message}")
        raise ProtocolError("\n".join(lines)) from None
    except ProtocolError as exc:
        raise ProtocolError(f"{source}: {exc}") from None


def load_protocol(path: str | Path) -> Protocol:
    """Read and check ``protocol.yaml``; :class:`ProtocolError` (exit 2) names the file, criterion and fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProtocolError(f"{path}: no such file; write the protocol's criteria there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{path}: cannot read it as UTF-8 text ({exc}); check the path") from None
    return protocol_from_text(text, source=str(path))
