"""The member data contract: can this AnnData join a federated run?

:func:`check_member` never raises on bad data; it returns a :class:`ContractReport` whose findings
each name the field, what is wrong and the fix, so a bioinformatician can mend everything in one pass.
Tasks are duck-typed: objects with ``name``, ``type`` and ``column`` (binary, regression) or
``time`` and ``event`` (survival), as parsed from consortium.yaml.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from omics.clinical import check_clinical
from omics.identifiers import kind_problem
from omics.labels import LabelError, binary_labels
from omics.labels import label_counts as label_counts  # re-exported: its callers import it from here
from omics.layout import LayoutError, MemberLayout, apply_layout
from omics.values import SAMPLED, count_findings, matrices_with_counts

Level = Literal["error", "warning"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""X and the targets become float32 for training: a larger finite value would turn into inf there."""


@dataclass(frozen=True)
class Finding:
    level: Level
    field: str
    message: str
    fix: str


@dataclass(frozen=True)
class ContractRules:
    """Thresholds of the contract (from consortium.yaml ``panel`` and ``data``)."""

    panel: Sequence[str]
    id_kind: str = "symbol"
    min_coverage: float = 0.8
    values: Literal["counts", "normalized"] = "counts"
    min_class_count: int = 25
    min_events: int = 25
    min_labeled: int = 50
    clinical: Sequence[Any] = ()
    """``panel.clinical``'s features (:class:`schema.clinical.ClinicalFeature`): obs columns as model inputs."""


@dataclass
class ContractReport:
    path: str
    n_samples: int = 0
    n_features: int = 0
    coverage: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    """What was read (``uns['layout']`` of :func:`omics.layout.apply_layout`): the matrix, the
    identifiers, how many Ensembl version suffixes were stripped, the symbol column."""
    clinical: list[str] = field(default_factory=list)
    """The clinical model inputs declared (``panel.clinical``), by name."""

    @property
    def fit(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def error(self, field_: str, message: str, fix: str) -> None:
        self.findings.append(Finding("error", field_, message, fix))

    def warn(self, field_: str, message: str, fix: str) -> None:
        self.findings.append(Finding("warning", field_, message, fix))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "fit": self.fit,
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "coverage": round(self.coverage, 4),
            "tasks": self.tasks,
            "layout": self.layout,
            "clinical": self.clinical,
            "findings": [asdict(f) for f in self.findings],
        }


def check_member(
    adata: ad.AnnData,
    *,
    tasks: Sequence[Any],
    rules: ContractRules,
    layout: MemberLayout = MemberLayout(),
    path: str | Path = "",
) -> ContractReport:
    """Check a member's data, read through ``layout``, against the contract; see the module docstring."""
    try:
        view = apply_layout(adata, layout=layout, path=path)
    except LayoutError as exc:
        report = ContractReport(path=str(path), n_samples=adata.n_obs, n_features=adata.n_vars)
        report.error(exc.field, exc.problem, exc.fix)
        return report
    sources = matrices_with_counts(adata, layout=layout) if rules.values == "counts" and rules.panel else []
    return check_view(view, tasks=tasks, rules=rules, path=path, count_sources=sources, member=layout.member)


def check_view(
    adata: ad.AnnData,
    *,
    tasks: Sequence[Any],
    rules: ContractRules,
    path: str | Path = "",
    count_sources: Sequence[str] = (),
    member: str = "",
    stored=None,
) -> ContractReport:
    """Check the platform's view of a member's data (the output of :func:`omics.layout.apply_layout`).

    ``count_sources``: the other matrices of the member's file that hold counts (see
    :func:`omics.values.matrices_with_counts`), named in the fix when the matrix read holds none; ``member``
    names the member there. ``stored``: the matrix whose values are checked when ``adata.X`` does not hold
    them (a member read in chunks: an :class:`omics.chunked.H5Matrix`, read a block of rows at a time)."""
    report = ContractReport(path=str(path), n_samples=adata.n_obs, n_features=adata.n_vars)
    report.layout = dict(adata.uns.get("layout", {}))
    omics = len(rules.panel) > 0  # a clinical-only consortium declares no omics panel: X is not read
    if adata.n_obs == 0 or (omics and adata.n_vars == 0):
        report.error(
            "X",
            f"the matrix is empty ({adata.n_obs} samples x {adata.n_vars} features)",
            "export the member's samples and features into the file",
        )
        return report
    if omics:
        _check_identifiers(adata, rules, report)
        _check_values(adata, rules, report, count_sources=count_sources, member=member, stored=stored)
    else:
        report.coverage = 1.0  # nothing to cover
    report.clinical = [name for feature in rules.clinical for name in feature.input_names()]
    for field_, problem, fix in check_clinical(adata.obs, rules.clinical):
        report.error(field_, problem, fix)
    for task in tasks:
        _check_task(adata.obs, task, rules, report)
    _check_split(adata.obs, report)
    return report


def _check_identifiers(adata: ad.AnnData, rules: ContractRules, report: ContractReport) -> None:
    names = adata.var_names.astype(str)
    dupes = names[names.duplicated()].unique()
    if len(dupes):
        report.error(
            "var_names",
            f"{len(dupes)} duplicate feature IDs, e.g. {list(dupes[:5])}",
            "aggregate or drop duplicated features so each ID appears once",
        )
    samples = adata.obs_names.astype(str)
    dup_samples = samples[samples.duplicated()].unique()
    if len(dup_samples):
        report.error(
            "obs_names",
            f"{len(dup_samples)} duplicate sample IDs, e.g. {list(dup_samples[:5])}",
            "give every sample a unique ID (obs_names)",
        )
    stripped = int(report.layout.get("versions_stripped") or 0)
    if stripped:
        report.warn(
            "var_names",
            f"{stripped} Ensembl IDs carried a version suffix (e.g. '.12'); matched to the panel without it",
            "nothing to do: versions are ignored when matching the panel",
        )
    symbols = re.fullmatch(r"var\['(.+)'\]", str(report.layout.get("symbols") or ""))
    problem = kind_problem(names, id_kind=rules.id_kind, panel=rules.panel, symbol_column=symbols and symbols[1])
    if problem is not None:
        report.error("var_names", *problem)
    panel = pd.Index(rules.panel)
    report.coverage = float(panel.isin(names).mean()) if len(panel) else 0.0
    if report.coverage < rules.min_coverage:
        report.error(
            "var_names",
            f"covers {report.coverage:.1%} of the {len(panel)}-feature panel, "
            f"below the required {rules.min_coverage:.0%}",
            "measure more panel features or check the identifier kind and spelling",
        )
    elif report.coverage < 1.0:
        report.warn(
            "var_names",
            f"{int(round((1 - report.coverage) * len(panel)))} panel features are not measured "
            f"(coverage {report.coverage:.1%})",
            "they are masked in var['measured'], not zero-padded",
        )


def _check_values(
    adata: ad.AnnData,
    rules: ContractRules,
    report: ContractReport,
    *,
    count_sources: Sequence[str],
    member: str,
    stored=None,
) -> None:
    if stored is None:
        X = adata.X
        dtype, blocks = (X.data if sp.issparse(X) else np.asarray(X)).dtype, None
    else:  # read from the file a block of rows at a time; counts judged on the first values, as in memory
        dtype, blocks, X = stored.dtype, stored.stored_blocks(), stored.first_stored(SAMPLED)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        report.error("X", f"dtype {dtype} is not a real number type", "store X as float32 or an integer type")
        return
    n_nan = n_inf = n_huge = 0
    for data in [X.data if sp.issparse(X) else np.asarray(X)] if blocks is None else blocks:
        n_nan += int(np.isnan(data).sum()) if np.issubdtype(data.dtype, np.floating) else 0
        n_inf += int(np.isinf(data).sum()) if np.issubdtype(data.dtype, np.floating) else 0
        n_huge += _beyond_float32(data)
    if n_nan or n_inf:
        report.error(
            "X",
            f"{n_nan} NaN and {n_inf} infinite values",
            "remove or re-quantify the affected measurements; missing values are not allowed in X",
        )
    if n_huge:
        report.error(
            "X",
            f"{n_huge} values beyond the float32 range (|x| > {FLOAT32_MAX:.3g}); they become infinite when "
            "the platform converts X to float32",
            "re-quantify the affected measurements or correct the units: counts and log values are far smaller",
        )
    if rules.values == "counts":
        for problem, fix in count_findings(X, sources=count_sources, member=member):
            report.error(_matrix_field(report), problem, fix)


def _matrix_field(report: ContractReport) -> str:
    """The matrix the platform read, as the findings name it: ``X``, ``layers['counts']`` or ``raw.X``."""
    return str(report.layout.get("matrix") or "X")


def _check_task(obs: pd.DataFrame, task: Any, rules: ContractRules, report: ContractReport) -> None:
    columns = [task.time, task.event] if task.type == "survival" else [task.column]
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        report.error(
            f"obs.{missing[0]}",
            f"task '{task.name}' needs column(s) {missing} in obs; found: {_preview(obs.columns)}",
            f"add {missing} to obs or fix the task's columns in consortium.yaml",
        )
        return
    if task.type == "binary":
        _check_binary(obs[task.column], task, rules, report)
    elif task.type == "regression":
        _check_regression(obs[task.column], task, rules, report)
    else:
        _check_survival(obs[task.time], obs[task.event], task, rules, report)


def _numeric(series: pd.Series, field_: str, task: Any, report: ContractReport) -> pd.Series | None:
    if series.dtype == bool:
        return series.astype(float)
    values = pd.to_numeric(series, errors="coerce")
    bad = series.notna() & values.isna()
    if bad.any():
        report.error(
            field_,
            f"task '{task.name}': {int(bad.sum())} non-numeric values, e.g. "
            f"{list(series[bad].astype(str).unique()[:3])}",
            "encode the column as numbers; leave missing labels empty (NaN)",
        )
        return None
    return values.astype(float)


def _check_binary(series: pd.Series, task: Any, rules: ContractRules, report: ContractReport) -> None:
    field_ = f"obs.{task.column}"
    try:
        values = binary_labels(series, task)
    except LabelError as exc:
        report.error(field_, exc.problem, exc.fix)
        return
    labeled = values.dropna()
    other = sorted(float(v) for v in set(labeled.unique()) - {0.0, 1.0})
    if other:
        report.error(
            field_,
            f"task '{task.name}' is binary but holds values {other[:5]}",
            "encode labels as 0/1 and leave missing labels empty (NaN), or name the label that means 1 with "
            f"`positive:` in task '{task.name}' of consortium.yaml",
        )
        return
    pos, neg = int((labeled == 1).sum()), int((labeled == 0).sum())
    report.tasks[task.name] = {"type": "binary", "labeled": pos + neg, "positives": pos, "negatives": neg}
    if getattr(task, "positive", None) is not None:
        report.tasks[task.name]["positive"] = task.positive
    if min(pos, neg) < rules.min_class_count:
        report.error(
            field_,
            f"task '{task.name}' has {pos} positives and {neg} negatives; the quorum is "
            f"{rules.min_class_count} of each",
            "add labelled samples or drop the task from consortium.yaml",
        )


def _check_regression(series: pd.Series, task: Any, rules: ContractRules, report: ContractReport) -> None:
    field_ = f"obs.{task.column}"
    values = _numeric(series, field_, task, report)
    if values is None:
        return
    labeled = values.dropna()
    if np.isinf(labeled).any():
        report.error(field_, f"task '{task.name}' holds infinite values", "replace them with measured values or NaN")
        return
    if _beyond_float32(labeled.to_numpy()):
        report.error(
            field_,
            f"task '{task.name}' holds values beyond the float32 range (|y| > {FLOAT32_MAX:.3g}), e.g. "
            f"{float(labeled.abs().max()):.3g}",
            "rescale the target (e.g. log-transform or change its unit)",
        )
        return
    report.tasks[task.name] = {"type": "regression", "labeled": int(labeled.size)}
    if labeled.size < rules.min_labeled:
        report.error(
            field_,
            f"task '{task.name}' has {labeled.size} labelled samples; the quorum is {rules.min_labeled}",
            "add labelled samples or drop the task from consortium.yaml",
        )
    elif labeled.size and float(labeled.std()) == 0.0:
        report.error(
            field_, f"task '{task.name}' has a constant target", "check the column; a constant cannot be learned"
        )


def _check_survival(time: pd.Series, event: pd.Series, task: Any, rules: ContractRules, report: ContractReport) -> None:
    t = _numeric(time, f"obs.{task.time}", task, report)
    e = _numeric(event, f"obs.{task.event}", task, report)
    if t is None or e is None:
        return
    both = t.notna() & e.notna()
    if (t.notna() != e.notna()).any():
        report.warn(
            f"obs.{task.event}",
            f"task '{task.name}': {int((t.notna() != e.notna()).sum())} samples have a "
            "time without an event or the reverse",
            "they are treated as unlabelled; fill both or neither",
        )
    unusable = t.notna() & (np.isinf(t) | (t.abs() > FLOAT32_MAX))
    if unusable.any():
        report.error(
            f"obs.{task.time}",
            f"task '{task.name}': {int(unusable.sum())} survival times are infinite or beyond the float32 "
            f"range, e.g. {t[unusable].iloc[0]:g}",
            "give a censored sample its last follow-up time with event 0, or leave the time empty (NaN)",
        )
    non_positive = int((t[both & ~unusable] <= 0).sum())
    if non_positive:
        report.error(
            f"obs.{task.time}",
            f"task '{task.name}': {non_positive} survival times are <= 0",
            "survival times must be positive (e.g. days from baseline)",
        )
    other = sorted(float(v) for v in set(e[both].unique()) - {0.0, 1.0})
    if other:
        report.error(
            f"obs.{task.event}",
            f"task '{task.name}': event indicator holds {other[:5]}",
            "encode events as 1 (event) and 0 (censored)",
        )
        return
    events = int((e[both] == 1).sum())
    report.tasks[task.name] = {"type": "survival", "labeled": int(both.sum()), "events": events}
    if events < rules.min_events:
        report.error(
            f"obs.{task.event}",
            f"task '{task.name}' has {events} events; the quorum is {rules.min_events}",
            "add follow-up data or drop the task from consortium.yaml",
        )


def _check_split(obs: pd.DataFrame, report: ContractReport) -> None:
    if "split" not in obs.columns:
        report.warn(
            "obs.split",
            "no stored train/val/test split",
            "run 'consortium data split' to store a reproducible stratified split "
            "(one is derived from the seed otherwise)",
        )
        return
    other = sorted(set(obs["split"].astype(str)) - {"train", "val", "test"})
    if other:
        report.error(
            "obs.split", f"holds values {other[:5]}", "use only 'train', 'val' and 'test', or delete the column"
        )
        return
    counts = obs["split"].astype(str).value_counts()
    for part in ("train", "val", "test"):
        if counts.get(part, 0) == 0:
            report.error("obs.split", f"no '{part}' samples", "re-create the split with 'consortium data split'")
    if counts.get("train", 0) == 1:
        report.error(
            "obs.split",
            "1 'train' sample; the scaling statistics need at least 2",
            "re-create the split with 'consortium data split'",
        )


def _beyond_float32(values: np.ndarray) -> int:
    """How many finite values are too large for float32."""
    if not np.issubdtype(values.dtype, np.floating) or values.dtype.itemsize <= 4:
        return 0
    with np.errstate(invalid="ignore"):
        return int((np.abs(values[np.isfinite(values)]) > FLOAT32_MAX).sum())


def _preview(items: Sequence[str], limit: int = 8) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") or "(none)"
