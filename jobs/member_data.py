"""consortium.yaml + a member's file -> the inputs of the models layer, the same way in every run.

The FLARE site and the baselines both call :func:`load_member`, so a member's data is checked,
split, normalized and harmonized identically wherever it is trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.data import MemberData, TaskSpec
from omics.contract import ContractRules
from omics.io import read_member
from omics.layout import MemberLayout
from omics.prepare import log_expression, member_arrays, prepare_member
from schema import settings
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedMember:
    """A member's model-ready samples, its log-scale expression (for the statistics) and its panel mask."""

    data: MemberData
    log_expression: np.ndarray
    measured: np.ndarray


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
    return LoadedMember(
        data=MemberData(**member_arrays(prepared, tasks=member.tasks)),
        log_expression=log_expression(prepared),
        measured=prepared.var["measured"].to_numpy(dtype=bool),
    )


def load_member_data(config: ConsortiumConfig, member_name: str, *, fold: int | None = None) -> MemberData:
    """The model-ready samples of one member (see :func:`load_member`)."""
    return load_member(config, member_name, fold=fold).data
