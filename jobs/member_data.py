"""consortium.yaml + a member's file -> the inputs of the models layer, the same way in every run.

The FLARE site and the baselines both call :func:`load_member`, so a member's data is checked,
split, normalized and harmonized identically wherever it is trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.data import MemberData, ScaledRows, TaskSpec
from omics.chunked import ChunkedRows, chunked_read, csr_rows_per_block, is_chunked
from omics.chunked_prepare import chunked_member_arrays, matrix_group, prepare_member_in_chunks
from omics.clinical import ClinicalBlock
from omics.contract import ContractRules
from omics.io import read_member
from omics.layout import MemberLayout
from omics.prepare import (
    log_expression,
    member_arrays,
    panel_scaling,
    prepare_member,
    pseudobulk_member,
    task_targets,
)
from schema import settings
from schema.config import ConsortiumConfig, task_columns

log = logging.getLogger(__name__)

_DENSE_BLOCK_VALUES = 2**22  # values of a dense member's rows summed at a time (scaling pieces)
_SPARSE_BLOCK_VALUES = 2**21  # nonzeros of a CSR member summed at a time (scaling pieces)


@dataclass
class StatisticsSamples:
    """The samples a member's association statistics are computed on: its samples, or for a single-cell
    member its pseudobulk samples (counts summed per sample), never its cells."""

    log_expression: np.ndarray
    obs: pd.DataFrame
    targets: dict[str, np.ndarray]
    measured: np.ndarray
    pseudobulk: bool = False


@dataclass
class LoadedMember:
    """A member's model-ready samples, its log-scale expression (for the statistics), its panel mask and
    the fixed scaling its samples were normalized with (:func:`omics.prepare.panel_scaling`)."""

    data: MemberData
    # float32, data.X's matrix (dense, CSR, or omics.chunked.ChunkedRows read from the file) less the clinical inputs
    log_expression: np.ndarray | sp.csr_matrix | ChunkedRows
    measured: np.ndarray
    statistics: StatisticsSamples | None = None
    scaling: dict | None = None
    clinical: ClinicalBlock | None = None
    """``panel.clinical``'s inputs as encoded (missing numeric values NaN), for the pooled scaling."""


def task_specs(config: ConsortiumConfig, member: str) -> list[TaskSpec]:
    return [TaskSpec(**spec) for spec in settings.task_specs(config, member)]


def load_member(config: ConsortiumConfig, member_name: str, *, fold: int | None = None) -> LoadedMember:
    """Read, check, split, normalize and harmonize one member's data.

    Parameters
    ----------
    fold
        With ``data.folds`` in the config: which fold is the test split (cross-validation).

    Raises
    ------
    omics.errors.OmicsError
        The file is unreadable or breaks the contract.
    """
    member = config.member(member_name)
    layout = MemberLayout(**settings.member_layout(config, member_name))
    options = {
        "tasks": member.tasks,
        "rules": ContractRules(**settings.contract_rules(config)),
        "val_fraction": config.data.val_fraction,
        "test_fraction": config.data.test_fraction,
        "seed": config.data.split_seed,
        "folds": config.data.folds,
        "fold": fold,
        "layout": layout,
    }
    raw = None
    if _read_in_chunks(member, layout):  # never whole: read from the file a block of rows at a time
        prepared, reader = prepare_member_in_chunks(member.data, **options)
        arrays = chunked_member_arrays(prepared, reader, tasks=member.tasks)
    else:
        # read once: a single-cell member's pseudobulk samples are summed from the file as read; any other
        # member's counts are not held past their normalization
        raw = read_member(member.data) if member.sample_column is not None else None
        prepared = prepare_member(read_member(member.data) if raw is None else raw, **options, path=str(member.data))
        # the log values, scaled per block of rows as they are read (never as a whole): the network and the
        # statistics read one matrix, not a scaled copy beside the log values
        arrays = member_arrays(prepared, tasks=member.tasks, scaled=False)
    scaling = panel_scaling(prepared)
    log_values = arrays["X"]
    arrays["X"] = ScaledRows(log_values, mean=scaling["mean"], std=scaling["std"], max_value=scaling["max_value"])
    data = MemberData(**arrays)
    measured = prepared.var["measured"].to_numpy(dtype=bool)
    # without clinical inputs the very matrix the network reads; with them, its first (panel) columns
    if is_chunked(log_values):
        values = log_values.panel()
    else:
        values = log_expression(prepared) if sp.issparse(log_values) else log_values[:, : prepared.n_vars]
    if member.sample_column is None:
        samples = StatisticsSamples(values, prepared.obs, data.targets, measured)
    else:
        samples = statistics_samples(config, member_name, adata=raw)
    clinical = None
    if "clinical" in prepared.uns:
        info = prepared.uns["clinical"]
        clinical = ClinicalBlock(list(info["names"]), list(info["kinds"]), np.asarray(prepared.obsm["clinical"]))
    return LoadedMember(
        data=data, log_expression=values, measured=measured, statistics=samples, scaling=scaling, clinical=clinical
    )


def _read_in_chunks(member, layout: MemberLayout) -> bool:
    """``members[].read``: a single-cell member's pseudobulk is summed in memory (``read: chunks`` is
    refused for it by the config), so ``auto`` reads it whole."""
    if member.sample_column is not None:
        return False
    return chunked_read(member.data, group=matrix_group(layout), read=member.read, member=member.name)


def statistics_samples(
    config: ConsortiumConfig, member_name: str, *, adata: ad.AnnData | None = None
) -> StatisticsSamples:
    """A single-cell member's pseudobulk samples (``members[].sample_column``) for the statistics, summed
    from ``adata`` (the member's file as read, unchanged; default: read it here)."""
    member = config.member(member_name)
    required = [c for task in member.tasks for c in task_columns(task)] + list(config.statistics.covariates)
    bulk = pseudobulk_member(
        read_member(member.data) if adata is None else adata,
        sample_column=member.sample_column,
        cell_type_column=member.cell_type_column,
        cell_type=member.cell_type,
        required_columns=required,
        panel=config.panel_features(),
        min_coverage=config.panel.min_coverage,
        layout=MemberLayout(**settings.member_layout(config, member_name)),
        path=str(member.data),
    )
    log.info("site %s: statistics on %d pseudobulk samples", member.name, bulk.n_obs)
    return StatisticsSamples(
        log_expression=log_expression(bulk),
        obs=bulk.obs,
        targets={task.name: task_targets(bulk.obs, task) for task in member.tasks},
        measured=bulk.var["measured"].to_numpy(dtype=bool),
        pseudobulk=True,
    )


def load_member_data(config: ConsortiumConfig, member_name: str, *, fold: int | None = None) -> MemberData:
    """The model-ready samples of one member (see :func:`load_member`)."""
    return load_member(config, member_name, fold=fold).data


def scaling_pieces(
    data: MemberData,
    log_values: np.ndarray,
    measured: np.ndarray,
    *,
    tasks: list[TaskSpec],
    minimum: int,
    clinical: ClinicalBlock | None = None,
) -> dict[str, np.ndarray]:
    """The training split's n, sum and sum of squares per panel feature (log values, the features the
    member measures) and per shared regression endpoint (labels), keyed ``scaling.<part>.<piece>``:
    summed over the members, they are the consortium's pooled scaling, which the registered model
    carries for scorers without statistics of their own. Nothing below the small-cell rule (``minimum``).

    ``clinical``: the clinical inputs follow the panel's features; a numeric one's pieces count its
    measured values; a level or indicator column (0/1, never scaled) sends zeros besides its n."""
    train = data.split == "train"
    if train.sum() < minimum:
        return {}
    total, squares = _train_sums(log_values, train)
    samples = measured.astype(np.float64) * float(train.sum())
    total, squares = np.where(measured, total, 0.0), np.where(measured, squares, 0.0)
    if clinical is not None:
        values = np.where(clinical.numeric[None, :], clinical.values[train], np.nan)
        present = ~np.isnan(values)
        samples = np.concatenate([samples, np.where(clinical.numeric, present.sum(axis=0), float(train.sum()))])
        total = np.concatenate([total, np.nansum(values, axis=0)])
        squares = np.concatenate([squares, np.nansum(values**2, axis=0)])
    out = {"scaling.features.samples": samples, "scaling.features.sum": total, "scaling.features.sumsq": squares}
    for task in tasks:
        labels = data.targets[task.name][train]
        labels = labels[np.isfinite(labels)]
        if task.kind == "regression" and task.shared and labels.size >= minimum:
            part = f"scaling.target_{task.name}"
            out[f"{part}.samples"] = np.array([float(labels.size)])
            out[f"{part}.sum"] = np.array([labels.sum()])
            out[f"{part}.sumsq"] = np.array([(labels**2).sum()])
    return out


def _train_sums(
    values: np.ndarray | sp.csr_matrix, train: np.ndarray, *, block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-feature sum and sum of squares over the ``train`` rows, one block of rows at a time (a
    CSR matrix from its nonzeros; a dense one's also a block of columns at a time), so no float64 copy of
    the train split is made."""
    p = values.shape[1]
    total, squares = np.zeros(p), np.zeros(p)
    if is_chunked(values):  # read from the file: its block size
        block = values.source.block_rows
    elif sp.issparse(values):  # rows of about _SPARSE_BLOCK_VALUES nonzeros
        block = csr_rows_per_block(values, nonzeros=_SPARSE_BLOCK_VALUES)
    if not sp.issparse(values) and not is_chunked(values):
        columns = max(1, _DENSE_BLOCK_VALUES // max(1, min(block, values.shape[0])))
        for start in range(0, values.shape[0], block):
            rows = train[start : start + block]
            for first in range(0, p, columns):
                part = values[start : start + block, first : first + columns][rows]
                total[first : first + columns] += part.sum(axis=0, dtype=np.float64)
                squares[first : first + columns] += np.square(part, dtype=np.float64).sum(axis=0)
        return total, squares
    for start in range(0, values.shape[0], block):
        part = values[start : start + block][train[start : start + block]]
        data = part.data.astype(np.float64)
        total += np.bincount(part.indices, weights=data, minlength=p)
        squares += np.bincount(part.indices, weights=data**2, minlength=p)
    return total, squares
