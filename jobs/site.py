"""One member site across the rounds of a federated run: the state the Client API script keeps.

The data, the network (trunk, shared heads, private heads) and the trainer (optimizer, and the Opacus
accountant when DP is on) are built once and live for the whole job: NVFlare's in-process Client API
executor runs ``client.py`` once and hands it every round.

What leaves the site, by construction (:func:`outgoing_state`): the trunk and the heads of shared
endpoints every round (with a survival endpoint and covariates, also the pieces of one Newton step of the
covariates' Cox model); in the last round also each endpoint's association statistics (sums that the
server only adds) and its normalized attribution vector, except for endpoints below the small-cell rule
(:mod:`jobs.site_statistics`), and the training split's n, sum and sum of squares per feature (and per
shared regression endpoint) for the consortium's pooled scaling. Private heads, the member's own target
scaling and feature scaling (kept in its ``scaling.json``) and samples never do. In plaintext, in the
result's meta: what the member publishes (validation figures each round, test figures with their
intervals at the end).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from jobs import member_data
from jobs.process_memory import training_heap
from jobs.sections import PUBLISHED_META, finalize, section_of, weighted_update
from jobs.site_outputs import SiteOutputs
from jobs.site_statistics import SiteStatistics
from models.attribution import normalized_scores, rank_features
from models.metrics import primary_metric
from models.network import HEAD_PREFIX, TRUNK_PREFIX, MultitaskNet
from models.privacy import PrivacySettings
from models.training import LocalTrainer, TrainSettings
from models.uncertainty import metric_interval
from schema import settings
from schema.config import ConsortiumConfig
from schema.names import KEY_METRIC

log = logging.getLogger(__name__)

STEPS_META = "NUM_STEPS_CURRENT_ROUND"
ATTRIBUTION_BOOTSTRAPS = 50
# The last round's attribution, bounded: integrated gradients with 8 path points (not 32) over at most
# 512 train samples per group (high and low outcome), so it costs about the same for a member of 1,000
# or 30,000 samples. On the synthetic consortium (3 members, 9 member endpoints) the precision at k of
# the rankings equals that of 32 points over every sample for 8 endpoints and is one planted feature
# in 24 lower for the ninth, at about a fifth of the integrated-gradient passes for the largest member
# (``benchmarks/overhead.py --attribution``).
ATTRIBUTION_STEPS = 8
ATTRIBUTION_ROWS_PER_GROUP = 512
# The site loop asks the Client API for the next round this often (its own default wait is 0.5 s)
RECEIVE_POLL_SECONDS = 0.02
COX_STATE = "cox_fit"  # beside the trainer's state in a checkpoint: the Cox coefficients this member reached
_SCALING_BUFFERS = (".target_mean", ".target_scale")  # a member's label statistics, also on a shared head


class MetricLogger(Protocol):
    """What the site needs of ``nvflare.client.tracking.MLflowWriter``."""

    def log_metric(self, key: str, value: float, step: int | None = None) -> None: ...


class FlareAPI(Protocol):
    """The part of ``nvflare.client`` a site loop calls (a fake one in tests)."""

    def is_running(self) -> bool: ...
    def receive(self, timeout: float | None = None) -> FLModel | None: ...
    def send(self, model: FLModel, clear_cache: bool = True) -> None: ...


class PrivateStateLeak(RuntimeError):
    """An outgoing update holds a key that may not leave the site: refuse to send it."""


class MemberSite:
    """A member's data, network and trainer, and what it publishes each round.

    Parameters
    ----------
    config
        The consortium, as read from ``consortium.yaml``.
    member
        The member this site is (its FLARE client name).
    outputs
        Where the site keeps its private outputs (final model, test predictions); never sent.
    tracker
        Per-round validation figures go here too (the Client API's ``MLflowWriter``); ``None`` skips it.
    fold
        Cross-validation fold that is the test split (with ``data.folds``).
    first_round
        A job that continues an interrupted one starts at this round: FLARE numbers its rounds from
        there and counts only the rest, and the trainer continues from the state this site saved after
        the round before (:meth:`SiteOutputs.save_checkpoint`), private heads included.
    """

    def __init__(
        self,
        config: ConsortiumConfig,
        member: str,
        *,
        outputs: SiteOutputs,
        tracker: MetricLogger | None = None,
        fold: int | None = None,
        statistics_only: bool = False,
        first_round: int = 0,
    ) -> None:
        self.config = config
        self.first_round = int(first_round)
        self.statistics_only = statistics_only
        self.member = config.member(member).name
        self.outputs = outputs
        self.tracker = tracker
        self.tasks = member_data.task_specs(config, self.member)
        loaded = member_data.load_member(config, self.member, fold=fold)
        self.data, self.log_expression, self.measured = loaded.data, loaded.log_expression, loaded.measured
        self.scaling, self.clinical = loaded.scaling, loaded.clinical
        self.statistics = SiteStatistics(config, self.member, loaded.statistics)
        self.model = MultitaskNet(
            self.data.n_features, self.tasks, **settings.network(config), seed=config.training.seed
        )
        self.trainer: LocalTrainer | None = None  # built on the first round, once the round count is known
        log.info(
            "site %s: %d samples x %d features, endpoints %s",
            self.member,
            len(self.data.X),
            self.data.n_features,
            [(t.name, "shared" if t.shared else "private") for t in self.tasks],
        )

    def _trainer(self, total_rounds: int) -> LocalTrainer:
        if self.trainer is None:
            dp = settings.privacy_settings(self.config)
            self.trainer = LocalTrainer(
                self.model,
                self.data,
                self.tasks,
                settings=TrainSettings(**settings.train_settings(self.config)),
                privacy=PrivacySettings(**dp) if dp else None,
                planned_epochs=settings.planned_epochs(self.config, rounds=total_rounds),
            )
            self.model = self.trainer.model  # the raw network, should the trainer have rebuilt it for DP
            if self.first_round:
                self._continue(self.trainer)
        return self.trainer

    def _continue(self, trainer: LocalTrainer) -> None:
        """Load the trainer this site saved after the round before ``first_round`` (or its latest one
        before that, had it dropped out earlier)."""
        kept = sorted(r for r in self.outputs.checkpoints() if r < self.first_round)
        if not kept:
            log.warning(
                "site %s: no saved trainer before round %d in %s; it continues with fresh private heads",
                self.member,
                self.first_round,
                self.outputs.folder,
            )
            return
        state = dict(self.outputs.load_checkpoint(round_=kept[-1]))
        self.statistics.load_state(state.pop(COX_STATE, None) or {})
        trainer.load_state_dict(state)
        if kept[-1] != self.first_round - 1:
            log.warning("site %s: continues from its round %d (it missed the rounds after)", self.member, kept[-1])
        log.info("site %s: continues at round %d from its saved round %d", self.member, self.first_round, kept[-1])

    def train_round(self, received: FLModel) -> FLModel:
        """Load the global shared state, train locally, validate; return the sum-ready update."""
        started = time.perf_counter()
        # FLARE counts a continuing job's own rounds only
        total = self.first_round + int(received.total_rounds) if received.total_rounds else self.config.training.rounds
        current = int(received.current_round or 0)
        state = finalize(received.params, received.meta)
        if self.statistics_only:
            self.statistics.absorb(state)  # the Cox pieces summed last round: one Newton step
            return self.statistics_round(current=current, total=total, started=started)
        trainer = self._trainer(total)  # a continuing job restores this member's Cox coefficients here
        self.statistics.absorb(state)
        # heads of private endpoints untouched; round 0 brings the server's initial trunk and shared heads
        self.model.load_shared_state({k: v for k, v in state.items() if k.startswith((TRUNK_PREFIX, HEAD_PREFIX))})
        with training_heap():  # its steps reuse the heap; the rest of the round gives freed arrays back
            stats = trainer.train(epochs=self.config.training.local_epochs)
        val = trainer.evaluate("val")
        published: dict[str, Any] = {
            "round": current,
            "total_rounds": total,
            "steps": stats.steps,
            "train_loss": float(stats.loss),
            "val": {name: figures for name, figures in val.items() if self.statistics.sends(name)},
            "epsilon": trainer.epsilon_spent(),
        }
        if current + 1 < total:  # what this site continues from, should the federation be interrupted
            params = {**outgoing_state(self.model), **self.statistics.every_round_sections()}
            self.outputs.save_checkpoint({**trainer.state_dict(), COX_STATE: self.statistics.state()}, round_=current)
        else:  # the last round: no round after it trains, so its memory goes to the extras (finish)
            trainer.release_training_state()
            final = self.finish()
            params = {**outgoing_state(self.model), **self.statistics.cox_sections(), **final["params"]}
            published.update(test=final["test"], samples=final["samples"], **self.statistics.summary())
        published["seconds"] = time.perf_counter() - started
        published["finished_at"] = time.time()  # wall clock: round times and overhead (benchmarks/overhead.py)
        published["peak_rss_mb"] = peak_rss_mb()
        weights = {section_of(k)[0]: float(stats.steps) for k in params if section_of(k)[1] == "mean"}
        update, meta = weighted_update(params, weights=weights)
        meta[PUBLISHED_META] = published
        meta[STEPS_META] = stats.steps
        self._track(current, published)
        return FLModel(
            params={k: torch.from_numpy(v) for k, v in update.items()},
            params_type=ParamsType.FULL,
            metrics={KEY_METRIC: self.key_metric(val)},
            current_round=current,
            meta=meta,
        )

    def statistics_round(self, *, current: int, total: int, started: float) -> FLModel:
        """``consortium stats``: only the statistics' pieces, no training. Every round sends them all (with a
        Cox model of covariates, each round is one Newton step; the tests use the last round's fit)."""
        params = {**self.statistics.cox_sections(), **self.association_sections()}
        published: dict[str, Any] = {
            "round": current,
            "total_rounds": total,
            "statistics_only": True,
            "samples": self.split_sizes(),
            "seconds": time.perf_counter() - started,
            "finished_at": time.time(),
            "peak_rss_mb": peak_rss_mb(),
            **self.statistics.summary(),
        }
        if not params:
            raise RuntimeError(
                f"site {self.member}: every endpoint is below the small-cell rule (data.min_cell_count = "
                f"{self.config.data.min_cell_count}); this member has nothing to send"
            )
        update, meta = weighted_update(params, weights={})
        meta[PUBLISHED_META] = published
        meta[STEPS_META] = 1
        return FLModel(
            params={k: torch.from_numpy(v) for k, v in update.items()},
            params_type=ParamsType.FULL,
            metrics={KEY_METRIC: 0.0},
            current_round=current,
            meta=meta,
        )

    def split_sizes(self) -> dict[str, int]:
        return {split: int((self.data.split == split).sum()) for split in ("train", "val", "test")}

    def association_sections(self) -> dict[str, np.ndarray]:
        """Each endpoint's summable association statistics (``stats.<endpoint>.*``); small cells send none."""
        return self.statistics.sections()

    def key_metric(self, val: Mapping[str, Mapping[str, float]]) -> float:
        values = [val[t.name].get(primary_metric(t.kind), math.nan) for t in self.tasks if t.name in val]
        finite = [v for v in values if math.isfinite(v)]
        return float(sum(finite) / len(finite)) if finite else 0.0

    def _track(self, current: int, published: Mapping[str, Any]) -> None:
        if self.tracker is None:
            return
        flat = {"train_loss": published["train_loss"], "seconds": published["seconds"]}
        if published.get("epsilon") is not None:
            flat["epsilon"] = published["epsilon"]
        for task, metrics in published["val"].items():
            flat.update({f"val/{task}/{name}": value for name, value in metrics.items()})
        for key, value in flat.items():
            if value is not None and math.isfinite(float(value)):
                self.tracker.log_metric(key, float(value), step=current)

    def finish(self) -> dict[str, Any]:
        """The last round's extras: test figures (touched once, here), statistics and attribution vectors."""
        trainer = self.trainer
        test = trainer.evaluate("test")
        part = self.data.subset("test")
        predictions = self.model.predict(part.X)
        for task in self.tasks:
            if not self.statistics.sends(task.name):
                test.pop(task.name, None)  # below the small-cell rule: no figure for it leaves the site
                continue
            interval = metric_interval(
                task.kind, part.targets[task.name], predictions[task.name], seed=self.config.training.seed
            )
            test[task.name]["ci"] = [interval.low, interval.high]
            test[task.name]["n"] = interval.n
        self.outputs.save_model(self.model, info=self.model_info())
        # the fixed preprocessing this member trained with: what it scores new samples with (never sent)
        self.outputs.save_scaling(
            self.scaling,
            targets={t.name: self.model.target_scaling(t.name) for t in self.tasks if t.kind == "regression"},
        )
        self.outputs.save_predictions(predictions, targets=part.targets)
        params = {**self.association_sections(), **self.scaling_sections()}
        train = self.data.subset("train")
        features = list(self.data.feature_names)
        for task in self.tasks:
            if not self.statistics.sends(task.name):
                continue
            table = rank_features(
                self.model,
                train.X,
                task.name,
                feature_names=features,
                labels=train.targets[task.name] if task.kind == "binary" else None,
                n_boot=ATTRIBUTION_BOOTSTRAPS,
                n_steps=ATTRIBUTION_STEPS,
                max_per_group=ATTRIBUTION_ROWS_PER_GROUP,
                seed=self.config.training.seed,
            )
            frequency = table.set_index("feature")["frequency"].reindex(features).fillna(0.0).to_numpy()
            params[f"consensus.{task.name}.score"] = normalized_scores(table, features)
            params[f"consensus.{task.name}.frequency"] = frequency
            params[f"consensus.{task.name}.members"] = np.ones(len(features))
        return {"params": params, "test": test, "samples": self.split_sizes()}

    def scaling_sections(self) -> dict[str, np.ndarray]:
        """The pieces of the consortium's pooled scaling (:func:`jobs.member_data.scaling_pieces`)."""
        return member_data.scaling_pieces(
            self.data,
            self.log_expression,
            self.measured,
            tasks=self.tasks,
            minimum=self.config.data.min_cell_count,
            clinical=self.clinical,
        )

    def model_info(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "n_features": self.data.n_features,
            "feature_names": list(self.data.feature_names),
            "tasks": [{"name": t.name, "kind": t.kind, "weight": t.weight, "shared": t.shared} for t in self.tasks],
            "network": settings.network(self.config),
        }


def outgoing_state(model: MultitaskNet) -> dict[str, np.ndarray]:
    """What the model contributes to an update: its shared state, checked against the private heads.

    ``shared_state`` is built from the trunk and the shared heads only; this check is the second
    safeguard, and fires if a private head's key, a head's target-scaling buffer or any other key
    ever slips into it.
    """
    state = model.shared_state()
    allowed = (TRUNK_PREFIX, *(f"{HEAD_PREFIX}{t.name}." for t in model.tasks if t.shared))
    leaked = sorted(k for k in state if not k.startswith(allowed) or k.endswith(_SCALING_BUFFERS))
    if leaked:
        raise PrivateStateLeak(f"refusing to send {leaked}; private heads and other state never leave a site")
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in state.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the member's FLARE job process), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(site: MemberSite, api: FlareAPI, *, poll: float = RECEIVE_POLL_SECONDS) -> int:
    """Answer every round the server sends until the job ends; returns the number of rounds done."""
    rounds = 0
    while (received := next_round(api, poll=poll)) is not None:
        api.send(site.train_round(received))
        rounds += 1
    return rounds


def next_round(api: FlareAPI, *, poll: float) -> FLModel | None:
    """The next round's model, or ``None`` once the job is over.

    ``flare.receive()`` and ``flare.is_running()`` look for a new model every 0.5 s (NVFlare 2.9's
    in-process Client API), up to half a second per round; ``receive(timeout=poll)`` looks every
    ``poll`` seconds. It also returns ``None`` when FLARE stopped the script, and then at once: only
    such an immediate ``None`` is checked with ``is_running()`` (which returns at once when stopped,
    and otherwise waits for the model, so a wrong guess costs time, never a round).
    """
    while True:
        asked = time.monotonic()
        received = api.receive(timeout=poll)
        if received is not None:
            return received
        if time.monotonic() - asked < poll / 2:
            return api.receive() if api.is_running() else None
