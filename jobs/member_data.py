"""consortium.yaml + a member's files -> the inputs of the models layer.

The one bridge between the typed config (``consortium.config``), the data layer (``omics``) and the
models layer (``models``); the FLARE client script and the baselines both call it, so a member's
data is prepared the same way in every run.
"""

from __future__ import annotations

import logging

from consortium.config import ConsortiumConfig
from models.data import MemberData, TaskSpec
from omics.contract import ContractRules
from omics.io import read_member
from omics.prepare import member_arrays, prepare_member

log = logging.getLogger(__name__)


def contract_rules(config: ConsortiumConfig) -> ContractRules:
    return ContractRules(
        panel=config.panel_features(),
        id_kind=config.panel.id_kind,
        min_coverage=config.panel.min_coverage,
        values=config.data.values,
        min_class_count=config.data.min_class_count,
        min_events=config.data.min_events,
        min_labeled=config.data.min_labeled,
    )


def task_specs(config: ConsortiumConfig, member_name: str) -> list[TaskSpec]:
    weights = config.training.task_weights
    return [TaskSpec(t.name, t.type, weights.get(t.name, 1.0)) for t in config.member(member_name).tasks]


def all_task_specs(config: ConsortiumConfig) -> dict[str, list[TaskSpec]]:
    return {m.name: task_specs(config, m.name) for m in config.members}


def load_member_data(config: ConsortiumConfig, member_name: str) -> MemberData:
    """Read, check, normalize, harmonize and split one member's data.

    Raises
    ------
    omics.errors.OmicsError
        The file is unreadable or breaks the contract.
    """
    member = config.member(member_name)
    adata = read_member(member.data)
    prepared = prepare_member(
        adata,
        tasks=member.tasks,
        rules=contract_rules(config),
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
        path=str(member.data),
    )
    return MemberData(**member_arrays(prepared, tasks=member.tasks))


def network_kwargs(config: ConsortiumConfig) -> dict:
    t = config.training
    return {"trunk_widths": list(t.trunk_widths), "head_width": t.head_width, "dropout": t.dropout}


def train_settings(config: ConsortiumConfig):
    from models.training import TrainSettings

    t = config.training
    return TrainSettings(
        epochs=t.local_epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        patience=t.patience,
        seed=t.seed,
    )


def privacy_settings(config: ConsortiumConfig):
    from models.privacy import PrivacySettings

    dp = config.privacy.dp
    if not dp.enabled:
        return None
    return PrivacySettings(epsilon=dp.epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm)


def planned_epochs(config: ConsortiumConfig, *, rounds: int | None = None) -> int:
    """Local epochs over the whole planned federated training: the span a DP budget must cover."""
    return (rounds or config.training.rounds) * config.training.local_epochs
