"""What a run's jobs produce, as named types: a finished job, a repetition of the comparison, the run's
result; and the comparison's arms read from what the members kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from consortium import comparison
from consortium.aside import Aside
from consortium.flare_env import JobOutcome
from consortium.results import JobResults, Released
from consortium.run_plan import RepetitionSpec
from jobs.site_outputs import PREDICTIONS_FILE, read_predictions, site_folder
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishedJob:
    """A job whose every round is done: where its server left it, what it received, and its aggregate
    opened (under HE by the key custodian)."""

    outcome: JobOutcome
    results: JobResults
    opened: Released

    @property
    def job_id(self) -> str:
        return self.outcome.job_id


@dataclass(frozen=True)
class Repetition:
    """One repetition (seed) of the comparison: its config, its finished jobs (one per fold), and the
    baselines computed beside them (``None`` without ``--baselines``)."""

    spec: RepetitionSpec
    config: ConsortiumConfig
    jobs: tuple[FinishedJob, ...]
    baselines: Aside | None

    def arms(self) -> comparison.ArmPredictions:
        """Each fold's arms with the federated test predictions the members kept, every fold's test samples
        in one set (out of fold with ``--folds``)."""
        baseline = self.baselines.result() if self.baselines is not None else None
        arms = comparison.ArmPredictions()
        for index, job in enumerate(self.spec.jobs):
            fold_arms = baseline[index] if baseline is not None else comparison.ArmPredictions()
            for member in self.config.members:
                folder = site_folder(job.outputs, member.name)
                if not (folder / PREDICTIONS_FILE).exists():
                    log.warning(
                        "member %s kept no test predictions (it dropped out); no comparison for it", member.name
                    )
                    continue
                kept = read_predictions(folder)
                fold_arms.add("federated", member.name, kept["prediction"])
                fold_arms.targets.setdefault(member.name, kept["target"])
            arms.extend(fold_arms)
        return arms


@dataclass
class RunResult:
    report: dict[str, Any]
    report_path: Path
    markdown_path: Path
    job_ids: list[str]


def seed_summary(config: ConsortiumConfig, arms_by_seed: list[comparison.ArmPredictions]) -> dict[str, Any]:
    """Per member and endpoint, each repetition's paired differences and their mean and sd."""
    kinds = {name: info["type"] for name, info in config.endpoints().items()}
    per_seed = [comparison.member_figures(arms, kinds=kinds, seed=config.training.seed) for arms in arms_by_seed]
    summary: dict[str, Any] = {"n": len(arms_by_seed), "paired_differences": {}}
    for member, tasks in per_seed[0].items():
        for task in tasks:
            for key in tasks[task]["difference"]:
                values = [s[member][task]["difference"][key]["estimate"] for s in per_seed]
                summary["paired_differences"].setdefault(member, {}).setdefault(task, {})[key] = {
                    "values": values,
                    "mean": float(np.mean(values)),
                    "sd": float(np.std(values, ddof=1)),
                }
    return summary
