"""consortium.yaml + a member's file -> the inputs of the models layer, the same way in every run.

The FLARE site and the baselines both call :func:`load_member`, so a member's data is checked,
split, normalized and harmonized identically wherever it is trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.data import MemberData, TaskSpec
from omics.contract import ContractRules
from omics.io import read_member
from omics.layout import MemberLayout
from omics.prepare import log_expression, member_arrays, prepare_member, pseudobulk_member, task_targets
from schema import settings
from schema.config import ConsortiumConfig, task_columns

log = logging.getLogger(__name__)


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
    """A member's model-ready samples, its log-scale expression (for the statistics) and its panel mask."""

    data: MemberData
    log_expression: np.ndarray
    measured: np.ndarray
    statistics: StatisticsSamples | None = None


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
    prepared = prepare_member(
        read_member(member.data),
        tasks=member.tasks,
        rules=ContractRules(**settings.contract_rules(config)),
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
        folds=config.data.folds,
        fold=fold,
        layout=MemberLayout(**settings.member_layout(config, member_name)),
        path=str(member.data),
    )
    data = MemberData(**member_arrays(prepared, tasks=member.tasks))
    measured = prepared.var["measured"].to_numpy(dtype=bool)
    values = log_expression(prepared)
    if member.sample_column is None:
        samples = StatisticsSamples(values, prepared.obs, data.targets, measured)
    else:
        samples = statistics_samples(config, member_name)
    return LoadedMember(data=data, log_expression=values, measured=measured, statistics=samples)


def statistics_samples(config: ConsortiumConfig, member_name: str) -> StatisticsSamples:
    """A single-cell member's pseudobulk samples (``members[].sample_column``) for the statistics."""
    member = config.member(member_name)
    required = [c for task in member.tasks for c in task_columns(task)] + list(config.statistics.covariates)
    bulk = pseudobulk_member(
        read_member(member.data),
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
