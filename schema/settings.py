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
        "clinical": list(config.panel.clinical),
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


def design_spec(config: ConsortiumConfig) -> dict[str, Any]:
    """Keyword arguments of ``omics.design.DesignSpec``: the declared design of the statistics."""
    statistics = config.statistics
    return {
        "formula": statistics.effective_formula(),
        "numeric": statistics.numeric(),
        "categorical": statistics.categorical(),
        "regions": tuple(config.regions()) if statistics.by == "region" else (),
    }


def statistics_release(config: ConsortiumConfig, endpoint: str) -> dict[str, Any]:
    """Keyword arguments of ``omics.statistics.endpoint_statistics`` besides the sums and the panel: a
    shared endpoint's row needs ``min_members`` contributors; an endpoint one member holds is that
    member's own analysis."""
    holders = config.endpoints()[endpoint]["members"]
    return {
        "kind": config.endpoints()[endpoint]["type"],
        "trend": config.statistics.trend,
        "robust": config.statistics.robust,
        "min_members": config.statistics_min_members() if len(holders) > 1 else 1,
    }


def cox_iterations(config: ConsortiumConfig) -> int:
    """Newton steps the federated Cox model of the covariates needs (0 without covariates or survival)."""
    survival = any(t.type == "survival" for t in config.tasks)
    return config.statistics.cox_iterations if survival and config.statistics.covariates else 0


WEIGHT_ITERATIONS = 3
"""Steps of the member weights' fixed point (limma's arrayWeights by member; 2-3 suffice)."""


def weight_iterations(config: ConsortiumConfig) -> int:
    """Steps of the member-level precision weights (0 unless ``statistics.member_weights``)."""
    linear = any(t.type != "survival" for t in config.tasks)
    return WEIGHT_ITERATIONS if config.statistics.member_weights and linear else 0


def statistics_rounds(config: ConsortiumConfig) -> int:
    """Rounds of ``consortium stats``: one, or one per iterative step (the Cox model of the covariates, the
    member weights) and one for the tests."""
    return max(cox_iterations(config), weight_iterations(config)) + 1
