"""A member's design matrix for federated linear models, encoded identically at every member.

The formula (Wilkinson notation, right-hand side only) and the levels of every categorical covariate
are declared in consortium.yaml, never inferred from one member's data: a member that holds only some
levels still gets every column, so the members' blocks line up column by column. ``endpoint`` is the
reserved name of the endpoint's values. The intercept is never a column: the caller removes member
effects by centering within member, which absorbs it (and any member-level covariate, see
:func:`check_design_rank`).

The formula is text another party wrote, so it is checked token by token before formulaic sees it:
only column names, ``+``, ``:``, ``*``, ``-``, parentheses, ``0`` and ``1``. formulaic would otherwise
evaluate any Python in a term (``np.log(age)``, ``{...}``), and every name it looks up here is a
declared column of the data frame handed to it, with an empty evaluation context.
"""

from __future__ import annotations

import keyword
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from formulaic import Formula, model_matrix
from formulaic.errors import FormulaicError
from formulaic.parser.types import Factor

from omics.errors import FieldError

log = logging.getLogger(__name__)

ENDPOINT = "endpoint"
"""The reserved name of the endpoint's values in a formula."""
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+)|(?P<op>[~+:*()-]))")
_ANSI = re.compile(r"\x1b\[[0-9;]*m|[⧛⧚]")
# relative tolerance of R's lm (dqrdc2): a column whose residual norm falls below tol x its norm is aliased
_RANK_TOLERANCE = 1e-7


class DesignError(FieldError):
    """The design cannot be built as declared; ``field``, ``problem`` and ``fix`` apart."""


@dataclass(frozen=True)
class DesignSpec:
    """The consortium's design (consortium.yaml ``statistics``).

    Attributes
    ----------
    formula
        Wilkinson right-hand side, e.g. ``"~ endpoint + age + sex + batch"``; ``endpoint`` is the
        endpoint's values. Only column names joined by ``+``, ``:``, ``*`` (and ``-`` to remove a term).
    numeric
        ``obs`` columns used as numeric covariates.
    categorical
        ``obs`` column -> declared levels; the first level is the reference (treatment coding).
    regions
        With subgroups by region: every region in config order (the first is the reference).
    """

    formula: str
    numeric: tuple[str, ...] = ()
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    regions: tuple[str, ...] = ()


def default_formula(numeric: Sequence[str], categorical: Mapping[str, Sequence[str]] | Sequence[str]) -> str:
    """``"~ endpoint + <numeric covariates> + <categorical covariates>"``, each in declaration order."""
    return " + ".join(["~ " + ENDPOINT, *numeric, *categorical])


def validate_spec(spec: DesignSpec, *, path: str = "") -> Formula:
    """Check the declared design without any member's data; returns the parsed formula.

    Raises
    ------
    DesignError
        The formula holds anything but column names and ``+ : * - ( ) 0 1``, cannot be parsed, has no
        intercept, or names an undeclared column; or the declarations themselves are inconsistent.
    """
    _check_declarations(spec, path=path)
    _check_tokens(spec.formula, path=path)
    try:
        formula = Formula(spec.formula)
    except (FormulaicError, SyntaxError) as exc:
        problem = _ANSI.sub("", str(exc)).strip().splitlines()[0]
        raise DesignError(
            "statistics.formula",
            f"formula '{spec.formula}' cannot be parsed: {problem}",
            "write it as '~ endpoint + covariate + ...' with '+', ':' and '*' between column names",
            path=path,
        ) from None
    terms = list(formula)
    if not any(str(term) == "1" for term in terms):
        raise DesignError(
            "statistics.formula",
            f"formula '{spec.formula}' has no intercept ('0 +' or '- 1'); member effects are removed by "
            "centering within member, which needs the intercept",
            "drop the '0 +' or '- 1' from the formula",
            path=path,
        )
    declared = {ENDPOINT, *spec.numeric, *spec.categorical}
    for term in terms:
        for factor in term.factors:
            # plain names are looked up in the data, never evaluated; anything else has been refused above
            if factor.eval_method not in (Factor.EvalMethod.LOOKUP, Factor.EvalMethod.LITERAL):
                raise DesignError(
                    "statistics.formula",
                    f"term '{factor.expr}' of formula '{spec.formula}' is not a column name",
                    "use plain column names joined by '+', ':' and '*'",
                    path=path,
                )
            if factor.eval_method == Factor.EvalMethod.LOOKUP and factor.expr not in declared:
                raise DesignError(
                    "statistics.formula",
                    f"formula '{spec.formula}' names column '{factor.expr}', which is declared neither in "
                    f"statistics.covariates (numeric: {list(spec.numeric)}; categorical: {list(spec.categorical)})",
                    f"declare '{factor.expr}' under statistics.covariates ('numeric', or its levels), "
                    "or remove it from the formula",
                    path=path,
                )
    return formula


def design_matrix(
    obs: pd.DataFrame,
    endpoint: np.ndarray | None,
    *,
    spec: DesignSpec,
    region: str | None = None,
    path: str = "",
) -> tuple[np.ndarray, list[str]]:
    """A member's design matrix without the intercept, with the same columns at every member.

    Parameters
    ----------
    obs
        The member's sample annotations; covariates are read from the columns the formula names.
    endpoint
        The endpoint's values per sample (0/1 or numeric, no missing values), or ``None`` for a survival
        endpoint: every column that involves ``endpoint`` is then left out (the result may have no column).
    spec
        The consortium's declared design.
    region
        The member's region, when ``spec.regions`` is declared: adds ``endpoint:region[R]`` (the endpoint
        where the member's region is ``R``, else 0) for every region ``R`` but the first. There is no region
        main effect: each member lies in one region, so the member factor absorbs it. Ignored without
        ``spec.regions``.
    path
        The member's file, for messages.

    Returns
    -------
    X, columns
        ``(n, k)`` float64 and the column names, e.g. ``endpoint``, ``age``, ``sex[M]``, ``endpoint:sex[M]``.

    Raises
    ------
    DesignError
        See :func:`validate_spec`; also a missing ``obs`` column, a missing, non-numeric or non-finite
        numeric covariate, a missing or undeclared categorical value, a formula without the term
        ``endpoint`` when ``endpoint`` is given, or an undeclared ``region``.

    Examples
    --------
    >>> obs = pd.DataFrame({"age": [50.0, 61.0, 47.0], "sex": ["F", "M", "F"]}, index=["s1", "s2", "s3"])
    >>> spec = DesignSpec("~ endpoint + age + sex", numeric=("age",), categorical={"sex": ("F", "M")})
    >>> X, columns = design_matrix(obs, np.array([1.0, 0.0, 1.0]), spec=spec)
    >>> columns
    ['endpoint', 'age', 'sex[M]']
    >>> X
    array([[ 1., 50.,  0.],
           [ 0., 61.,  1.],
           [ 1., 47.,  0.]])
    >>> design_matrix(obs, None, spec=spec)[1]  # survival: the covariates only
    ['age', 'sex[M]']
    """
    formula = validate_spec(spec, path=path)
    names = {factor.expr for term in formula for factor in term.factors}
    if endpoint is not None and not any(str(term) == ENDPOINT for term in formula):
        raise DesignError(
            "statistics.formula",
            f"formula '{spec.formula}' has no term '{ENDPOINT}', so the endpoint's effect has no column",
            f"add '{ENDPOINT} +' to the formula",
            path=path,
        )
    data = pd.DataFrame(index=pd.RangeIndex(len(obs)))
    for name in [n for n in (*spec.numeric, *spec.categorical) if n in names]:
        _require_column(obs, name, path=path)
        if name in spec.numeric:
            data[name] = _numeric_covariate(obs, name, path=path)
        else:
            data[name] = _categorical_covariate(obs, name, spec.categorical[name], path=path)
    values = _endpoint_values(endpoint, len(obs), path=path)
    # a survival endpoint is materialized as zeros and its columns dropped: the other terms keep the coding
    # (reference levels and all) they have in the formula as written
    data[ENDPOINT] = values if values is not None else 0.0
    matrix = model_matrix(formula, data, context={}, na_action="raise", ensure_full_rank=True)
    keep: list[str] = []
    for structure in matrix.model_spec.structure:
        factors = {factor.expr for factor in structure.term.factors}
        if str(structure.term) == "1" or (values is None and ENDPOINT in factors):
            continue
        keep.extend(structure.columns)
    X = matrix[keep].to_numpy(dtype=np.float64) if keep else np.zeros((len(obs), 0))
    columns = [name.replace("[T.", "[") for name in keep]
    if values is not None and spec.regions:
        X, columns = _with_region_interactions(X, columns, values, spec=spec, region=region, path=path)
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DesignError(
            "design",
            f"the design has two columns named {duplicated}",
            "rename the obs column that clashes with the region interaction (e.g. a column named 'region')",
            path=path,
        )
    return np.ascontiguousarray(X), columns


def check_design_rank(blocks: Sequence[np.ndarray], *, columns: Sequence[str]) -> list[str]:
    """The columns that are not estimable once member is a factor, as R's ``lm`` would report NA.

    Each block (one member's design, from :func:`design_matrix`) is centered within member, which is
    what the member factor does; the stacked result is reduced column by column in order (Gram-Schmidt
    with R's relative tolerance of 1e-7), so a column is reported when it is a combination of earlier
    columns or constant within every member (e.g. a batch level seen at one member only, or a batch that
    coincides with member).

    Raises
    ------
    ValueError
        A block does not have ``len(columns)`` columns.
    """
    columns = list(columns)
    raw, centered = [], []
    for i, block in enumerate(blocks):
        block = np.asarray(block, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != len(columns):
            raise ValueError(f"design block {i} has shape {block.shape}; expected (n, {len(columns)}) for {columns}")
        if block.shape[0]:
            raw.append(block)
            centered.append(block - block.mean(axis=0))
    if not raw:
        return columns
    Z, scale = np.vstack(centered), np.linalg.norm(np.vstack(raw), axis=0)
    basis = np.zeros((Z.shape[0], 0))
    aliased = []
    for j, name in enumerate(columns):
        residual = Z[:, j]
        for _ in range(2):  # orthogonalize twice: classical Gram-Schmidt loses orthogonality once
            residual = residual - basis @ (basis.T @ residual)
        norm = float(np.linalg.norm(residual))
        if scale[j] == 0.0 or norm <= _RANK_TOLERANCE * scale[j]:
            aliased.append(name)
            continue
        basis = np.column_stack([basis, residual / norm])
    if aliased:
        log.info("design columns not estimable with member as a factor: %s", aliased)
    return aliased


def _check_declarations(spec: DesignSpec, *, path: str) -> None:
    both = sorted(set(spec.numeric) & set(spec.categorical))
    if both:
        raise DesignError(
            "statistics.covariates",
            f"{both} are declared both numeric and categorical",
            "declare each covariate once",
            path=path,
        )
    for name in [*spec.numeric, *spec.categorical]:
        if name == ENDPOINT:
            raise DesignError(
                "design",
                f"'{ENDPOINT}' is declared as a covariate, but it is the reserved name of the endpoint's values",
                f"rename the obs column and its declaration (e.g. '{ENDPOINT}_obs')",
                path=path,
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or keyword.iskeyword(name) or name.startswith("__"):
            raise DesignError(
                "design",
                f"covariate '{name}' is not a plain column name (letters, digits and '_', not a Python keyword)",
                "rename the obs column and its declaration, e.g. 'age_at_diagnosis'",
                path=path,
            )
    for name, levels in spec.categorical.items():
        levels = [str(level) for level in levels]
        if not levels or len(set(levels)) != len(levels):
            raise DesignError(
                f"statistics.covariates.{name}",
                f"declared levels {levels} are empty or repeat a level",
                "list each level once; the first is the reference",
                path=path,
            )
    if len(set(spec.regions)) != len(spec.regions):
        problem = f"regions {list(spec.regions)} repeat a region"
        raise DesignError("members[].region", problem, "list each region once", path=path)


def _check_tokens(formula: str, *, path: str) -> None:
    """Refuse anything but names, ``0``/``1`` and ``~ + : * - ( )`` before formulaic sees the text."""
    fix = (
        "use plain column names joined by '+', ':' and '*' (e.g. '~ endpoint + age + sex'); transform "
        "covariates in obs before joining, not in the formula"
    )
    position, previous = 0, None
    tildes = 0
    while position < len(formula.rstrip()):
        match = _TOKEN.match(formula, position)
        if match is None:
            at = len(formula) - len(formula[position:].lstrip())
            raise DesignError(
                "statistics.formula",
                f"formula '{formula}' holds {formula[at]!r} at position {at}; only column names and "
                "'+', ':', '*', '-', '(', ')', '0', '1' are allowed",
                fix,
                path=path,
            )
        kind, text = match.lastgroup, match.group(match.lastgroup)
        if kind == "op" and text == "(" and previous is not None and previous[0] in ("name", "number", ")"):
            raise DesignError(
                "statistics.formula",
                f"formula '{formula}' calls '{previous[1]}(...)'; function calls are not allowed in a formula",
                fix,
                path=path,
            )
        if kind == "op" and text == "*" and formula[match.end() : match.end() + 1] == "*":
            raise DesignError("statistics.formula", f"formula '{formula}' uses powers ('**')", fix, path=path)
        if kind == "number" and text not in ("0", "1"):
            problem = f"formula '{formula}' holds the number {text}; only 0 and 1 have a meaning"
            raise DesignError("statistics.formula", problem, fix, path=path)
        if kind == "name" and keyword.iskeyword(text):
            raise DesignError("statistics.formula", f"formula '{formula}' holds the keyword '{text}'", fix, path=path)
        if text == "~":
            tildes += 1
            if previous is not None or tildes > 1:
                raise DesignError(
                    "statistics.formula",
                    f"formula '{formula}' has a left-hand side; the design takes the right-hand side only",
                    "write '~ endpoint + ...' (the features are the responses)",
                    path=path,
                )
        previous = (")" if text == ")" else kind, text)
        position = match.end()


def _require_column(obs: pd.DataFrame, name: str, *, path: str) -> None:
    if name not in obs.columns:
        found = [str(c) for c in obs.columns]
        more = f", ... ({len(found)} in all)" if len(found) > 10 else ""
        raise DesignError(
            f"obs.{name}",
            f"the design needs column '{name}' in obs; found: [{', '.join(found[:10])}{more}]",
            f"add '{name}' to obs, or remove it from statistics.formula",
            path=path,
        )


def _first(obs: pd.DataFrame, mask: np.ndarray) -> str:
    return str(obs.index[np.flatnonzero(mask)[0]])


def _require_complete(obs: pd.DataFrame, name: str, *, path: str) -> None:
    missing = obs[name].isna().to_numpy()
    if missing.any():
        raise DesignError(
            f"obs.{name}",
            f"covariate '{name}' is missing in {int(missing.sum())} samples (first: '{_first(obs, missing)}')",
            "fill the values (e.g. impute them before joining) or drop those samples; a design has no missing values",
            path=path,
        )


def _numeric_covariate(obs: pd.DataFrame, name: str, *, path: str) -> np.ndarray:
    _require_complete(obs, name, path=path)
    series = obs[name]
    if series.dtype == bool:
        return series.to_numpy(dtype=np.float64)
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = series.iloc[first]
        shown = repr(value) if isinstance(value, str) else str(value)
        raise DesignError(
            f"obs.{name}",
            f"numeric covariate '{name}' has {int(bad.sum())} non-numeric or non-finite values (first: sample "
            f"'{obs.index[first]}', value {shown})",
            f"encode '{name}' as finite numbers, or declare it under statistics.covariates with its levels",
            path=path,
        )
    return values


def _level_strings(series: pd.Series) -> pd.Series:
    """Values as the strings levels are declared as: whole floats like 2.0 read as '2'."""
    values = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
    if pd.api.types.is_float_dtype(values) and np.all(np.mod(values.to_numpy(), 1) == 0):
        values = values.astype(np.int64)
    return values.astype(str)


def _categorical_covariate(obs: pd.DataFrame, name: str, levels: Sequence[str], *, path: str) -> pd.Categorical:
    _require_complete(obs, name, path=path)
    levels = [str(level) for level in levels]
    values = _level_strings(obs[name])
    unknown = ~values.isin(levels).to_numpy()
    if unknown.any():
        found = sorted(values[unknown].unique())
        raise DesignError(
            f"obs.{name}",
            f"categorical covariate '{name}' holds {found[:10]} in {int(unknown.sum())} samples (first: "
            f"'{_first(obs, unknown)}'), not among the declared levels {levels}",
            f"declare the level(s) under statistics.covariates.{name} in consortium.yaml, or recode them to a "
            "declared level",
            path=path,
        )
    return pd.Categorical(values.to_numpy(), categories=levels)


def _endpoint_values(endpoint: np.ndarray | None, n: int, *, path: str) -> np.ndarray | None:
    if endpoint is None:
        return None
    values = np.asarray(endpoint, dtype=np.float64).reshape(-1)
    if values.shape[0] != n:
        raise ValueError(f"endpoint has {values.shape[0]} values for {n} samples in obs")
    bad = ~np.isfinite(values)
    if bad.any():
        raise DesignError(
            ENDPOINT,
            f"the endpoint is missing or not finite for {int(bad.sum())} samples",
            "drop unlabelled samples before building the design",
            path=path,
        )
    return values


def _with_region_interactions(
    X: np.ndarray, columns: list[str], values: np.ndarray, *, spec: DesignSpec, region: str | None, path: str
) -> tuple[np.ndarray, list[str]]:
    if region is None or region not in spec.regions:
        raise DesignError(
            "region",
            f"the design has subgroups by region {list(spec.regions)}, but this member's region is {region!r}",
            "give the member one of the declared regions in consortium.yaml",
            path=path,
        )
    others = spec.regions[1:]
    extra = np.column_stack([values * (region == other) for other in others]) if others else np.zeros((len(X), 0))
    return np.hstack([X, extra]), [*columns, *(f"{ENDPOINT}:region[{other}]" for other in others)]
