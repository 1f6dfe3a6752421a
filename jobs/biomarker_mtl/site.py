"""One member site across the rounds of a federated run: the state the Client API script keeps.

The data, the network (trunk + private heads) and the trainer (optimizer, and the Opacus privacy
accountant when DP is on) are built once and live for the whole job: NVFlare's in-process Client API
executor runs ``client.py`` once, in one thread of the site's job process, and hands it every round.

Only the trunk leaves the site. :meth:`MemberSite.train_round` builds the outgoing ``FLModel`` from
``MultitaskNet.trunk_state()`` and checks it against the trunk's own keys before it is returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from consortium.config import ConsortiumConfig
from jobs import member_data
from jobs.site_outputs import RoundRecord, SiteOutputs
from models.attribution import rank_features
from models.metrics import primary_metric
from models.network import MultitaskNet
from models.training import LocalTrainer

log = logging.getLogger(__name__)

KEY_METRIC = "val_primary"  # mean over the member's tasks of each task's primary validation metric
TRUNK_PREFIX = "trunk."


class MetricLogger(Protocol):
    """What the site needs of ``nvflare.client.tracking.MLflowWriter``."""

    def log_metric(self, key: str, value: float, step: int | None = None) -> None: ...


class FlareAPI(Protocol):
    """The part of ``nvflare.client`` a site loop calls (a fake one in tests)."""

    def is_running(self) -> bool: ...
    def receive(self, timeout: float | None = None) -> FLModel | None: ...
    def send(self, model: FLModel, clear_cache: bool = True) -> None: ...


class PrivateStateLeak(RuntimeError):
    """An outgoing model holds a key that is not one of the trunk's: refuse to send it."""


class MemberSite:
    """A member's data, network and trainer, and what it writes each round.

    Parameters
    ----------
    config
        The consortium, as read from ``consortium.yaml``.
    member
        The member this site is (its FLARE client name).
    outputs
        Where the site writes ``metrics.jsonl``, ``model.pt`` and the biomarker rankings.
    tracker
        Per-round metrics go here too (the Client API's ``MLflowWriter``); ``None`` skips it.
    """

    def __init__(
        self,
        config: ConsortiumConfig,
        member: str,
        *,
        outputs: SiteOutputs,
        tracker: MetricLogger | None = None,
    ) -> None:
        self.config = config
        self.member = config.member(member).name
        self.outputs = outputs
        self.tracker = tracker
        self.tasks = member_data.task_specs(config, self.member)
        self.data = member_data.load_member_data(config, self.member)
        self.network = member_data.network_kwargs(config)
        self.model = MultitaskNet(self.data.n_features, self.tasks, **self.network, seed=config.training.seed)
        self.trainer: LocalTrainer | None = None  # built on the first round, once the round count is known
        self.rankings_written = False
        outputs.start()
        log.info("site %s: %d samples x %d features, tasks %s", self.member, len(self.data.X),
                 self.data.n_features, [t.name for t in self.tasks])

    def _trainer(self, total_rounds: int) -> LocalTrainer:
        if self.trainer is None:
            self.trainer = LocalTrainer(
                self.model,
                self.data,
                self.tasks,
                settings=member_data.train_settings(self.config),
                privacy=member_data.privacy_settings(self.config),
                planned_epochs=member_data.planned_epochs(self.config, rounds=total_rounds),
            )
            self.model = self.trainer.model  # the raw network, should the trainer have rebuilt it for DP
        return self.trainer

    def train_round(self, received: FLModel) -> FLModel:
        """Load the global trunk, train locally, evaluate, record; return the trunk-only update."""
        started = time.perf_counter()
        total = int(received.total_rounds or self.config.training.rounds)
        current = int(received.current_round or 0)
        trainer = self._trainer(total)
        self.model.load_trunk_state(received.params)  # heads untouched; round 0 brings the server's init
        stats = trainer.train(epochs=self.config.training.local_epochs)
        val, test = trainer.evaluate("val"), trainer.evaluate("test")
        params = outgoing_trunk(self.model)
        record = RoundRecord(
            site=self.member,
            round=current,
            total_rounds=total,
            seconds=time.perf_counter() - started,
            steps=stats.steps,
            train_loss=float(stats.loss),
            val=val,
            test=test,
            bytes_sent=sum(t.numel() * t.element_size() for t in params.values()),
            epsilon=trainer.epsilon_spent(),
        )
        self._record(record)
        if current + 1 >= total:
            # the job may end as soon as the last update is sent: write the final outputs first
            self.finish()
        metrics = {**record.flat_metrics(), KEY_METRIC: self.key_metric(val)}
        return FLModel(
            params=params,
            params_type=ParamsType.FULL,
            metrics=metrics,
            current_round=current,
            meta={"NUM_STEPS_CURRENT_ROUND": stats.steps},
        )

    def key_metric(self, val: Mapping[str, Mapping[str, float]]) -> float:
        values = [val[t.name].get(primary_metric(t.kind), math.nan) for t in self.tasks if t.name in val]
        finite = [v for v in values if math.isfinite(v)]
        return float(sum(finite) / len(finite)) if finite else 0.0

    def _record(self, record: RoundRecord) -> None:
        self.outputs.append_round(record)
        self.outputs.save_model(self.model, info=self.model_info())
        if self.tracker is not None:
            for key, value in record.flat_metrics().items():
                self.tracker.log_metric(key, value, step=record.round)

    def model_info(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "n_features": self.data.n_features,
            "feature_names": list(self.data.feature_names),
            "tasks": [{"name": t.name, "kind": t.kind, "weight": t.weight} for t in self.tasks],
            "network": dict(self.network),
        }

    def finish(self) -> None:
        """Write the final checkpoint and each task's biomarker ranking (train split); once."""
        if self.rankings_written:
            return
        self.outputs.save_model(self.model, info=self.model_info())
        train = self.data.subset("train")
        for task in self.tasks:
            table = rank_features(self.model, train.X, task.name, feature_names=list(self.data.feature_names))
            self.outputs.write_ranking(task.name, table)
        self.rankings_written = True


def outgoing_trunk(model: MultitaskNet) -> dict[str, torch.Tensor]:
    """The tensors a site sends: the trunk's, checked key by key against the trunk itself.

    Tensors, not numpy arrays: the PyTorch Client API converts them to numpy for the wire and would
    drop anything that is not a tensor.
    """
    params = model.trunk_state()
    allowed = {f"{TRUNK_PREFIX}{k}" for k in model.trunk.state_dict()}
    leaked = sorted(set(params) - allowed)
    if leaked:
        raise PrivateStateLeak(f"refusing to send non-trunk keys {leaked}; only trunk parameters may leave a site")
    return params


def serve(site: MemberSite, api: FlareAPI) -> int:
    """Answer every round the server sends until the job ends; returns the number of rounds done."""
    rounds = 0
    while api.is_running():
        received = api.receive()
        if received is None:
            break
        api.send(site.train_round(received))
        rounds += 1
    site.finish()
    return rounds
