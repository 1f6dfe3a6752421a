"""A member's association statistics across the rounds of a job: the pieces it sends, and the Cox fit.

Each endpoint's pieces (:func:`omics.statistics.site_statistics`) go out as ``stats.<endpoint>.*``
sections that the server only adds. A survival endpoint with covariates first needs the covariates' Cox
model, stratified by member: each round the member sends its pieces of one Newton step at the current
coefficients (``coxfit.<endpoint>.*``), reads the summed pieces back with the next round's model, and
takes the same Newton step as every other member (they all read the same sum). The feature tests use
the coefficients reached by the last round; the release reports how close to convergence they were.

One small-cell rule covers everything a member sends for an endpoint: below it (fewer than
``data.min_cell_count`` samples in a class, labelled samples or events; samples, not cells, for a
pseudobulked member) the member sends no statistics, no Cox pieces, no attribution vector and no test
figures for that endpoint, and says so in its published record (``small_cell``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np

from jobs.member_data import StatisticsSamples
from jobs.sections import select
from omics.cox import CoxStep
from omics.design import DesignSpec
from omics.statistics import (
    EndpointDesign,
    below_small_cell,
    design_columns,
    next_cox_step,
    next_member_weight,
    site_cox_fit,
    site_statistics,
)
from schema import settings
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

STATS, COXFIT = "stats", "coxfit"


class SiteStatistics:
    """One member's statistics state: its samples, its design, and each survival endpoint's Cox coefficients."""

    def __init__(self, config: ConsortiumConfig, member: str, samples: StatisticsSamples) -> None:
        self.member = config.member(member).name
        self.samples = samples
        self.design = EndpointDesign(
            spec=DesignSpec(**settings.design_spec(config)),
            min_cell=config.data.min_cell_count,
            region=config.member(member).region,
            detection=config.data.values == "counts",
        )
        self.kinds = {task.name: task.type for task in config.member(member).tasks}
        self.withheld = sorted(
            name
            for name, kind in self.kinds.items()
            if below_small_cell(samples.targets[name], kind=kind, min_cell=self.design.min_cell)
        )
        if self.withheld:
            log.info(
                "site %s: below the small-cell rule (data.min_cell_count=%d) for %s: nothing is sent for them",
                self.member,
                self.design.min_cell,
                self.withheld,
            )
        self.cox_beta: dict[str, np.ndarray] = {}
        self.cox_steps: dict[str, int] = {}
        self.cox_last: dict[str, CoxStep] = {}  # the last step taken: step-halving compares with its anchor
        self.weights: dict[str, float] = {}  # member-level precision weights (statistics.member_weights)
        self.weight_steps: dict[str, int] = {}
        # a clinical-only consortium has no omics feature to test: no statistics, no Cox fit for them
        self.omics = samples.log_expression.shape[1] > 0
        if settings.weight_iterations(config) and self.omics:
            for name, kind in self.kinds.items():
                if kind != "survival":
                    self.weights[name], self.weight_steps[name] = 1.0, 0
        if settings.cox_iterations(config) and self.omics:
            for name, kind in self.kinds.items():
                if kind == "survival":
                    self.cox_beta[name] = np.zeros(len(design_columns(self.design.spec, kind="survival")))
                    self.cox_steps[name] = 0

    def sends(self, endpoint: str) -> bool:
        """Whether this member sends anything for ``endpoint`` (it is not below the small-cell rule)."""
        return endpoint not in self.withheld

    def absorb(self, received: Mapping[str, np.ndarray]) -> None:
        """Take one Newton step for each survival endpoint whose summed Cox pieces came with the model, and
        one step of this member's precision weight for each linear endpoint whose summed pieces came."""
        for name, summed in select(received, COXFIT).items():
            if name in self.cox_beta and summed and self.sends(name):
                step = next_cox_step(summed, self.cox_beta[name], previous=self.cox_last.get(name))
                self.cox_last[name], self.cox_beta[name] = step, np.asarray(step.beta, dtype=np.float64)
                self.cox_steps[name] += 1
        for name, summed in select(received, STATS).items():
            if name in self.weights and summed and self.sends(name):
                self.weights[name] = next_member_weight(
                    self.samples.log_expression,
                    self.samples.targets[name],
                    self.samples.obs,
                    summed,
                    design=self.design,
                    weight=self.weights[name],
                    measured=self.samples.measured,
                )
                self.weight_steps[name] += 1

    def every_round_sections(self) -> dict[str, np.ndarray]:
        """What a training round sends besides the model: the Cox pieces, and with member weights the linear
        endpoints' pieces (each member's next weight is computed from their sum)."""
        out = self.cox_sections()
        if self.weights:
            out.update(self.sections(endpoints=self.weights))
        return out

    def cox_sections(self) -> dict[str, np.ndarray]:
        """``coxfit.<endpoint>.*``: this member's pieces of the next Newton step at the current coefficients."""
        out: dict[str, np.ndarray] = {}
        for name, beta in self.cox_beta.items():
            if not self.sends(name):
                continue
            pieces = site_cox_fit(self.samples.targets[name], self.samples.obs, design=self.design, beta=beta)
            for key, value in (pieces or {}).items():
                out[f"{COXFIT}.{name}.{key}"] = value
        return out

    def sections(self, *, endpoints: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """``stats.<endpoint>.*``: each endpoint's pieces (of ``endpoints`` only, when given), except those
        below the small-cell rule."""
        out: dict[str, np.ndarray] = {}
        for name, kind in self.kinds.items() if self.omics else ():
            if not self.sends(name) or (endpoints is not None and name not in endpoints):
                continue
            pieces = site_statistics(
                self.samples.log_expression,
                self.samples.targets[name],
                self.samples.obs,
                kind=kind,
                design=self.design,
                measured=self.samples.measured,
                cox_beta=self.cox_beta.get(name),
                weight=self.weights.get(name, 1.0),
                path=f"member {self.member}",
            )
            for key, value in (pieces or {}).items():
                out[f"{STATS}.{name}.{key}"] = value
        return out

    def state(self) -> dict:
        """The Cox coefficients reached (plain floats), kept with the member's checkpoint so that a job that
        continues an interrupted one takes its next Newton step from where this member left off."""
        return {
            "cox_beta": {name: [float(v) for v in beta] for name, beta in self.cox_beta.items()},
            "cox_steps": dict(self.cox_steps),
            "cox_anchor": {
                name: [[float(v) for v in last.anchor], float(last.anchor_loglik)]
                for name, last in self.cox_last.items()
            },
            "weights": dict(self.weights),
            "weight_steps": dict(self.weight_steps),
        }

    def load_state(self, state: Mapping) -> None:
        """Restore :meth:`state` (endpoints no longer held, or of another size, are ignored)."""
        for name, beta in (state.get("cox_beta") or {}).items():
            if name in self.cox_beta and len(beta) == len(self.cox_beta[name]):
                self.cox_beta[name] = np.asarray(beta, dtype=np.float64)
                self.cox_steps[name] = int((state.get("cox_steps") or {}).get(name, 0))
                anchor = (state.get("cox_anchor") or {}).get(name)
                if anchor is not None:
                    beta = self.cox_beta[name]
                    self.cox_last[name] = CoxStep(beta, 0.0, anchor[1], False, np.asarray(anchor[0]), anchor[1])
        for name, weight in (state.get("weights") or {}).items():
            if name in self.weights:
                self.weights[name] = float(weight)
                self.weight_steps[name] = int((state.get("weight_steps") or {}).get(name, 0))

    def summary(self) -> dict:
        """What the published record says about the statistics (plaintext: counts and settings only)."""
        return {
            "small_cell": list(self.withheld),
            "statistics_samples": int(len(self.samples.obs)),
            "pseudobulk": bool(self.samples.pseudobulk),
            "cox_newton_steps": dict(self.cox_steps),
            "member_weight_steps": dict(self.weight_steps),
        }
