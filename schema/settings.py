"""Adapters from ``consortium.yaml`` to the keyword arguments of the ``omics`` and ``models`` settings.

The bottom package imports neither layer, so each adapter returns plain keyword arguments:
``omics.contract.ContractRules(**contract_rules(config))``,
``omics.layout.MemberLayout(**member_layout(config, member))``,
``models.training.TrainSettings(**train_settings(config))``, and so on. Every caller (a FLARE site, the
baselines, ``consortium data check``) goes through these, so a setting is read in one place.
"""

from __future__ import annotations

from typing import Any

from schema.config import ConsortiumConfig


def contract_rules(config: ConsortiumConfig) -> dict[str, Any]:
    """Keyword arguments of ``omics.contract.ContractRules``."""
    return {
        "panel": config.panel_features(),
        "id_kind": config.panel.id_kind,
        "min_coverage": config.panel.min_coverage,
        "values": config.data.values,
        "min_class_count": config.data.min_class_count,
        "min_events": config.data.min_events,
        "min_labeled": config.data.min_labeled,
    }


def member_layout(config: ConsortiumConfig, member: str) -> dict[str, Any]:
    """Keyword arguments of ``omics.layout.MemberLayout``: where the member's file keeps its data."""
    entry = config.member(member)
    return {
        "layer": entry.layer,
        "var_id_column": entry.var_id_column,
        "symbol_column": entry.symbol_column,
        "member": entry.name,
    }


def task_specs(config: ConsortiumConfig, member: str) -> list[dict[str, Any]]:
    """Keyword arguments of one ``models.data.TaskSpec`` per endpoint the member holds."""
    weights = config.training.task_weights
    shared = set(config.shared_endpoints())
    return [
        {"name": t.name, "kind": t.type, "weight": weights.get(t.name, 1.0), "shared": t.name in shared}
        for t in config.member(member).tasks
    ]


def network(config: ConsortiumConfig) -> dict[str, Any]:
    """Keyword arguments of ``models.network.MultitaskNet`` besides the panel size and tasks."""
    t = config.training
    return {"trunk_widths": list(t.trunk_widths), "head_width": t.head_width, "dropout": t.dropout}


def train_settings(config: ConsortiumConfig, *, epochs: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``models.training.TrainSettings`` (``epochs`` defaults to the local epochs)."""
    t = config.training
    return {
        "epochs": epochs or t.local_epochs,
        "batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "patience": t.patience,
        "seed": t.seed,
    }


def privacy_settings(config: ConsortiumConfig) -> dict[str, Any] | None:
    """Keyword arguments of ``models.privacy.PrivacySettings``; ``None`` without DP."""
    dp = config.privacy.dp
    if not dp.enabled:
        return None
    return {"epsilon": dp.epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm}


def planned_epochs(config: ConsortiumConfig, *, rounds: int | None = None) -> int:
    """Local epochs over the whole planned federated training: the span a DP budget must cover."""
    return (rounds or config.training.rounds) * config.training.local_epochs
