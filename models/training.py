"""Local training of one member's multitask network: per federated round, or to convergence.

A federated client keeps one :class:`LocalTrainer` for the whole run and, each round, loads the
aggregated state with ``trainer.model.load_shared_state(...)``, calls ``trainer.train(epochs=k)``
and sends ``trainer.model.shared_state()`` (the trunk and the heads of shared endpoints). The
optimizer (and, with DP, the Opacus engine and its accountant) lives as long as the trainer.
Baselines call :meth:`LocalTrainer.fit` instead, which selects the epoch by
:meth:`LocalTrainer.validation_score`: the same rule for every model that is compared.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from models.data import MemberData, ScaledRows, TaskSpec
from models.losses import multitask_loss
from models.metrics import evaluate, primary_metric
from models.network import MultitaskNet
from models.privacy import PrivacySettings, PrivateTraining, make_private

logger = logging.getLogger(__name__)

VALIDATION_BLOCK = 4096  # validation rows per forward pass: a large (sparse) member is never made dense whole


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Optimization settings of a member's local training (AdamW).

    Attributes
    ----------
    epochs
        Epochs per call of :meth:`LocalTrainer.train` when none are given, and the cap of
        :meth:`LocalTrainer.fit`.
    batch_size
        Mini-batch size (with DP: the expected size of Poisson-sampled batches).
    learning_rate, weight_decay
        AdamW parameters.
    patience
        Epochs without a better validation score (:meth:`LocalTrainer.validation_score`) before
        :meth:`LocalTrainer.fit` stops.
    seed
        Seeds shuffling, dropout and DP noise of the trainer.
    """

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainSettings.{name}={getattr(self, name)}; use an integer >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainSettings.learning_rate={self.learning_rate}; use a value > 0, e.g. 1e-3")
        if self.weight_decay < 0:
            raise ValueError(f"TrainSettings.weight_decay={self.weight_decay}; use a value >= 0")


@dataclass(frozen=True)
class TrainStats:
    """One :meth:`LocalTrainer.train` call: optimizer steps, mean batch loss, wall seconds."""

    steps: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """One :meth:`LocalTrainer.fit` call; the model holds the weights of ``best_epoch``.

    Attributes
    ----------
    epochs
        Epochs trained in this call.
    best_epoch
        The selected epoch (1-based): the one with the highest validation score, or the last.
    best_score
        :meth:`LocalTrainer.validation_score` of the selected weights; ``nan`` without
        validation labels.
    best_val_loss
        The validation loss of the selected weights, for reporting only (it does not select).
    seconds
        Wall time of the call.
    scores
        The validation score after each epoch when selecting (``scores[best_epoch - 1] ==
        best_score``); empty with ``select=False``.
    """

    epochs: int
    best_epoch: int
    best_score: float
    best_val_loss: float
    seconds: float
    scores: tuple[float, ...] = ()


def _target_tensors(
    labels: Mapping[str, np.ndarray], tasks: Sequence[TaskSpec], model: MultitaskNet
) -> dict[str, torch.Tensor]:
    targets = {}
    for task in tasks:
        y = np.asarray(labels[task.name], dtype=np.float64)
        if task.kind == "regression":
            mean, scale = model.target_scaling(task.name)
            y = (y - mean) / scale
        targets[task.name] = torch.from_numpy(y.astype(np.float32))
    return targets


class LocalTrainer:
    """Trains a member's :class:`~models.network.MultitaskNet` on its own train split.

    Parameters
    ----------
    model
        The network; ``trainer.model`` stays this exact (unwrapped) object, also under DP.
    data
        The member's samples; rows with split ``"train"`` are trained on, ``"val"`` drives
        :meth:`fit`'s early stopping.
    tasks
        The member's tasks; the same names as the model's heads.
    settings
        Optimization settings.
    privacy
        DP-SGD budget; ``None`` trains without DP.
    planned_epochs
        With ``privacy``: every epoch this trainer will run (federated rounds x local epochs);
        the noise is calibrated so the budget is spent exactly then, and more raises
        :class:`~models.privacy.PrivacyBudgetExceeded`. Ignored without ``privacy``.

    Notes
    -----
    Regression targets are standardized with the train split's mean and standard deviation,
    stored in the model's (private) heads via :meth:`MultitaskNet.set_target_scaling`.
    """

    def __init__(
        self,
        model: MultitaskNet,
        data: MemberData,
        tasks: Sequence[TaskSpec],
        *,
        settings: TrainSettings,
        privacy: PrivacySettings | None = None,
        planned_epochs: int | None = None,
    ) -> None:
        self.model = model
        self.data = data
        self.tasks = tuple(tasks)
        self.settings = settings
        self._check_inputs()
        # the splits are row numbers into the member's X, not copies of it; a minibatch gathers its rows
        # (a member's ScaledRows builds them dense, scaled, for that batch only)
        self._x = data.X if isinstance(data.X, ScaledRows) else torch.from_numpy(data.X)
        self._train_rows = torch.from_numpy(np.flatnonzero(data.split == "train"))
        self._val_rows = torch.from_numpy(np.flatnonzero(data.split == "val"))
        if self._train_rows.numel() == 0:
            raise ValueError("the train split is empty; mark some rows split='train'")
        train_targets = {name: y[self._train_rows.numpy()] for name, y in data.targets.items()}
        self._set_target_scaling(train_targets)
        self._y_train = _target_tensors(train_targets, self.tasks, model)
        self._y_val = _target_tensors(
            {n: y[self._val_rows.numpy()] for n, y in data.targets.items()}, self.tasks, model
        )
        self._val_tasks = [t for t in self.tasks if _has_labels(self._y_val[t.name])]
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self._rng_state = torch.Generator().manual_seed(int(settings.seed)).get_state()
        self.epochs_done = 0
        self._private: PrivateTraining | None = None
        self._train_module: torch.nn.Module = model
        if privacy is not None:
            self._private = make_private(
                model,
                self.optimizer,
                n_samples=int(self._train_rows.numel()),
                batch_size=settings.batch_size,
                privacy=privacy,
                planned_epochs=planned_epochs,
            )
            self.optimizer = self._private.optimizer
            self._train_module = self._private.module

    # -- setup -----------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        names = [t.name for t in self.tasks]
        if sorted(names) != sorted(self.model.task_names):
            raise ValueError(
                f"tasks {sorted(names)} differ from the model's heads {sorted(self.model.task_names)}; "
                "build the model with the same tasks"
            )
        if self.model.n_features != self.data.n_features:
            raise ValueError(
                f"the model takes {self.model.n_features} features, the data has {self.data.n_features}; "
                "harmonize the data to the consortium panel"
            )
        for task in self.tasks:
            if task.name not in self.data.targets:
                raise KeyError(f"task '{task.name}' has no targets in the data; it has {sorted(self.data.targets)}")
            shape = self.data.targets[task.name].shape
            expected = (self.data.X.shape[0], 2) if task.kind == "survival" else (self.data.X.shape[0],)
            if shape != expected:
                raise ValueError(f"targets of {task.kind} task '{task.name}' have shape {shape}; expected {expected}")
            _check_label_values(task, np.asarray(self.data.targets[task.name], dtype=np.float64))
        X = self.data.X
        bad = X.nonfinite() if isinstance(X, ScaledRows) else int((~np.isfinite(X)).sum())
        if bad:
            raise ValueError(
                f"X holds {bad} NaN/inf values; missing measurements must be handled by the omics layer "
                "(harmonize and normalize) before training"
            )

    def _set_target_scaling(self, train_targets: Mapping[str, np.ndarray]) -> None:
        for task in self.tasks:
            if task.kind != "regression":
                continue
            y = np.asarray(train_targets[task.name], dtype=np.float64)
            y = y[~np.isnan(y)]
            if y.size < 2 or not np.std(y) > 0:
                logger.warning("task '%s': %d train labels, too few to standardize; not scaling", task.name, y.size)
                mean, scale = (float(y.mean()) if y.size else 0.0), 1.0
            else:
                mean, scale = float(y.mean()), float(y.std())
            self.model.set_target_scaling(task.name, mean=mean, scale=scale)

    # -- training --------------------------------------------------------------------------------

    def _batches(self) -> Iterator[torch.Tensor]:
        if self._private is not None:
            for batch in self._private.data_loader:
                # Poisson sampling can draw an empty batch; the step must still run (and be accounted)
                yield batch[0] if len(batch) else torch.zeros(0, dtype=torch.long)
            return
        order = torch.randperm(int(self._train_rows.numel()))
        yield from torch.split(order, self.settings.batch_size)

    def train(self, *, epochs: int | None = None) -> TrainStats:
        """Run ``epochs`` local epochs (default ``settings.epochs``) with the persistent optimizer.

        The model is left in eval mode, ready for :meth:`evaluate` and attribution.

        Raises
        ------
        PrivacyBudgetExceeded
            With DP, if this would run past ``planned_epochs``; nothing is trained then.
        """
        epochs = self.settings.epochs if epochs is None else int(epochs)
        if epochs < 1:
            raise ValueError(f"epochs={epochs}; train at least one epoch")
        if self._private is not None:
            self._private.check_budget(epochs_done=self.epochs_done, epochs_requested=epochs)
        started = time.perf_counter()
        steps, loss_sum, loss_steps = 0, 0.0, 0
        # A private RNG stream (shuffling, dropout, Poisson sampling, DP noise) that continues
        # across calls and leaves the global RNG as it was.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus' hooks fire on the first layer although the input needs no gradient: harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.set_rng_state(self._rng_state)
            self._train_module.train()
            with self._private.per_sample_gradients() if self._private else nullcontext():
                for _ in range(epochs):
                    for rows in self._batches():
                        loss = self._step(rows)
                        steps += 1
                        if rows.numel():
                            loss_sum, loss_steps = loss_sum + loss, loss_steps + 1
            self._rng_state = torch.get_rng_state()
        self.model.eval()
        self.epochs_done += epochs
        mean_loss = loss_sum / loss_steps if loss_steps else float("nan")
        stats = TrainStats(steps=steps, loss=mean_loss, seconds=time.perf_counter() - started)
        logger.debug("trained %d epochs (%d total): %s", epochs, self.epochs_done, stats)
        return stats

    def _step(self, rows: torch.Tensor) -> float:
        x = self._rows(self._train_rows[rows])
        targets = {name: y[rows] for name, y in self._y_train.items()}
        self.optimizer.zero_grad(set_to_none=True)
        loss = multitask_loss(self._train_module(x), targets, self.tasks)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(self._x):
            return self._x[rows]
        return torch.from_numpy(self._x.dense(rows.numpy()))

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Multitask loss on the whole val split in eval mode; ``nan`` if it holds no label."""
        if not any(_has_labels(y) for y in self._y_val.values()):
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        try:
            blocks = [self.model(self._rows(rows)) for rows in torch.split(self._val_rows, VALIDATION_BLOCK)]
            outputs = {t.name: torch.cat([b[t.name] for b in blocks]) for t in self.tasks}
            return float(multitask_loss(outputs, self._y_val, self.tasks))
        finally:
            self.model.train(was_training)

    def validation_score(self) -> float:
        """Mean primary validation metric over the tasks with validation labels; ``nan`` if none.

        The primary metric is AUROC for binary, R2 for regression and the C-index for survival
        tasks (:func:`models.metrics.primary_metric`). Unlike the summed validation loss, no task
        kind dominates and overconfidence that keeps the ranking does not count against a model.
        A task whose metric is undefined on the split (one class only, no comparable pair) is
        left out of the mean.
        """
        if not self._val_tasks:
            return float("nan")
        metrics = evaluate(self.model, self.data, self._val_tasks, split="val")
        values = [metrics[t.name][primary_metric(t.kind)] for t in self._val_tasks]
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    def fit(self, max_epochs: int | None = None, *, select: bool = True) -> FitResult:
        """Train epoch by epoch; with ``select``, early-stop on the validation score, keep the best.

        Parameters
        ----------
        max_epochs
            Upper bound on epochs (default ``settings.epochs``).
        select
            ``True``: after each epoch compute :meth:`validation_score`, stop after
            ``settings.patience`` epochs without improvement and restore the weights of the best
            epoch (without validation labels: train ``max_epochs`` and keep the last weights).
            ``False``: train exactly ``max_epochs`` and keep the last weights.
        """
        max_epochs = self.settings.epochs if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise ValueError(f"max_epochs={max_epochs}; fit at least one epoch")
        started = time.perf_counter()
        if not select:
            self.train(epochs=max_epochs)
            return self._fit_result(epochs=max_epochs, best_epoch=max_epochs, started=started)
        if not self._val_tasks:
            logger.warning("no validation labels; early stopping off, training all %d epochs", max_epochs)
            self.train(epochs=max_epochs)
            return self._fit_result(epochs=max_epochs, best_epoch=max_epochs, started=started)
        best_score, best_epoch, waited = -math.inf, 0, 0
        best_state = _copy_state(self.model)
        scores: list[float] = []
        for epoch in range(1, max_epochs + 1):
            self.train(epochs=1)
            score = self.validation_score()
            scores.append(score)
            if best_epoch == 0 or _improves(score, best_score):
                best_score, best_epoch, waited = score, epoch, 0
                best_state = _copy_state(self.model)
            else:
                waited += 1
                if waited >= self.settings.patience:
                    break
        self.model.load_state_dict(best_state)
        logger.debug("fit: %d epochs, selected epoch %d, validation score %.4f", len(scores), best_epoch, best_score)
        return self._fit_result(
            epochs=len(scores), best_epoch=best_epoch, started=started, score=best_score, scores=scores
        )

    def _fit_result(
        self,
        *,
        epochs: int,
        best_epoch: int,
        started: float,
        score: float | None = None,
        scores: Sequence[float] = (),
    ) -> FitResult:
        return FitResult(
            epochs=epochs,
            best_epoch=best_epoch,
            best_score=self.validation_score() if score is None else float(score),
            best_val_loss=self.validation_loss(),
            seconds=time.perf_counter() - started,
            scores=tuple(scores),
        )

    # -- resuming --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a later :meth:`train` depends on: the whole network (private heads included),
        the optimizer, the private RNG stream, the epochs done and, with DP, the accountant's history.
        A site keeps it on its own disk to continue an interrupted federation; it is never sent."""
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng_state": self._rng_state.clone(),
            "epochs_done": self.epochs_done,
            "accountant": self._private.engine.accountant.state_dict() if self._private else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; DP on one side and not the other is refused."""
        if (state.get("accountant") is None) != (self._private is None):
            raise ValueError(
                "the saved trainer state and this trainer disagree on DP (privacy.dp.enabled changed?); "
                "an interrupted run continues only with the settings it started with"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._rng_state = state["rng_state"].clone()
        self.epochs_done = int(state["epochs_done"])
        if self._private is not None:
            self._private.engine.accountant.load_state_dict(state["accountant"])

    def release_training_state(self) -> None:
        """Free what only further training reads: the gradients and the optimizer's moments (for a wide
        panel's first layer, three times its weights). A member calls it after its last round's training,
        before the test figures, statistics and attribution; a later :meth:`train` would start the
        moments afresh."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    # -- reporting -------------------------------------------------------------------------------

    def evaluate(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Metrics per task on one split of this member's data (see :func:`models.metrics.evaluate`)."""
        return evaluate(self.model, self.data, self.tasks, split=split)

    def epsilon_spent(self) -> float | None:
        """DP epsilon spent so far at the planned delta; ``None`` when training without DP."""
        return None if self._private is None else self._private.epsilon_spent()

    @property
    def noise_multiplier(self) -> float | None:
        """DP-SGD noise multiplier calibrated for the plan; ``None`` without DP."""
        return None if self._private is None else self._private.noise_multiplier


def _check_label_values(task: TaskSpec, y: np.ndarray) -> None:
    observed = y[~np.isnan(y).any(axis=1)] if y.ndim == 2 else y[~np.isnan(y)]
    if not np.isfinite(observed).all():
        raise ValueError(f"task '{task.name}' has infinite labels; use NaN for a missing label")
    if task.kind == "binary" and not np.isin(observed, (0.0, 1.0)).all():
        found = [float(v) for v in np.unique(observed) if v not in (0.0, 1.0)][:5]
        raise ValueError(f"binary task '{task.name}' has labels {found}; use 0/1 (NaN when missing)")
    if task.kind == "survival":
        if not np.isin(observed[:, 1], (0.0, 1.0)).all():
            raise ValueError(f"survival task '{task.name}' has event values other than 0/1; use 1 = event")
        if (observed[:, 0] < 0).any():
            raise ValueError(f"survival task '{task.name}' has negative times; times must be >= 0")


def _improves(score: float, best: float) -> bool:
    # An undefined score (nan) never beats a defined one; while none is defined the latest epoch
    # is kept, as without validation labels.
    if math.isnan(score):
        return math.isnan(best)
    return math.isnan(best) or score > best + 1e-6


def _has_labels(y: torch.Tensor) -> bool:
    return bool(y.numel()) and bool((~torch.isnan(y)).any())


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
