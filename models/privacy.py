"""DP-SGD with Opacus, accounted over the whole planned training.

A member's privacy budget covers every step it will ever take on its data: all federated rounds
times the local epochs per round. So the :class:`~opacus.PrivacyEngine` is made once (by
:class:`models.training.LocalTrainer`), with ``epochs = planned_epochs`` over that whole plan,
and training past the plan raises :class:`PrivacyBudgetExceeded` instead of silently spending
more than the member agreed to.

Caveat: the Cox partial likelihood couples the samples of a batch through the risk sets, so the
per-sample gradients Opacus clips for a survival head are each sample's share of a coupled loss;
the formal guarantee is exact for the binary and regression heads.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# opacus is imported where DP-SGD is set up, not here: a member site with DP off never loads it
# (about 115 MB and seconds of start-up per member process).

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp", "gdp")


class PrivacyBudgetExceeded(RuntimeError):
    """Training was asked to go past the epochs the privacy budget was planned for."""


@dataclass(frozen=True)
class PrivacySettings:
    """A member's DP-SGD budget.

    Attributes
    ----------
    epsilon
        Target epsilon over the whole planned training (all rounds x local epochs).
    delta
        Target delta; should be well below ``1 / n_train``.
    max_grad_norm
        Per-sample gradient clipping bound.
    accountant
        Opacus accountant: ``"rdp"`` (default: an upper bound, calibrates in about a second) or
        ``"prv"`` (tighter, so less noise for the same budget, but calibration takes ~10 s of CPU).
    """

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"PrivacySettings.epsilon={self.epsilon}; use a finite value > 0, e.g. 8.0")
        if not 0 < self.delta < 1:
            raise ValueError(f"PrivacySettings.delta={self.delta}; use a value in (0, 1), below 1/n_train")
        if not self.max_grad_norm > 0:
            raise ValueError(f"PrivacySettings.max_grad_norm={self.max_grad_norm}; use a value > 0, e.g. 1.0")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"PrivacySettings.accountant='{self.accountant}'; use one of {ACCOUNTANTS}")


def validate_for_dp(model: nn.Module) -> None:
    """Raise ``ValueError`` listing the layers Opacus cannot train privately (e.g. BatchNorm)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors)
        raise ValueError(
            f"the model cannot be trained with DP-SGD: {details}. Use LayerNorm instead of BatchNorm "
            "(opacus.validators.ModuleValidator.fix does it)"
        )


@dataclass
class PrivateTraining:
    """What :func:`make_private` wires up; held by the trainer for the whole planned training."""

    engine: PrivacyEngine
    module: nn.Module  # the Opacus GradSampleModule wrapping the trainer's model
    optimizer: torch.optim.Optimizer  # the DPOptimizer wrapping the trainer's optimizer
    data_loader: DataLoader  # Poisson-sampled batches of row indices into the train split
    settings: PrivacySettings
    planned_epochs: int

    @contextmanager
    def per_sample_gradients(self) -> Iterator[None]:
        """Opacus' hooks on, for training steps only.

        Off otherwise, so the raw model behaves like a plain module outside training: an input
        gradient (attribution) or a forward pass with grad enabled would else feed the hooks
        activations they never consume, or backprops with no activations to pair with.
        """
        self.module.enable_hooks()
        try:
            yield
        finally:
            self.module.disable_hooks()

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    def epsilon_spent(self) -> float:
        """Epsilon spent so far at the planned delta (0 before the first step)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        return float(self.engine.get_epsilon(self.settings.delta))

    def check_budget(self, *, epochs_done: int, epochs_requested: int) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if the request goes past the planned epochs."""
        if epochs_done + epochs_requested > self.planned_epochs:
            raise PrivacyBudgetExceeded(
                f"DP budget (epsilon={self.settings.epsilon}, delta={self.settings.delta}) was planned for "
                f"{self.planned_epochs} epochs; {epochs_done} are done and {epochs_requested} more were "
                f"requested ({epochs_done + epochs_requested} in all). Plan for more epochs "
                "(planned_epochs = rounds x local epochs) or stop training."
            )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    n_samples: int,
    batch_size: int,
    privacy: PrivacySettings,
    planned_epochs: int,
) -> PrivateTraining:
    """Wrap ``model`` and ``optimizer`` for DP-SGD over ``planned_epochs`` epochs of ``n_samples``.

    The data loader yields batches of row indices (Poisson sampling at rate
    ``batch_size / n_samples``), so the trainer keeps its tensors and only gathers rows.
    ``model`` itself is not renamed or copied: Opacus wraps the same object.
    """
    if planned_epochs is None or int(planned_epochs) < 1:
        raise ValueError(
            f"planned_epochs={planned_epochs}; DP-SGD needs the whole plan up front "
            "(federated rounds x local epochs per round)"
        )
    if n_samples < 1:
        raise ValueError("no training samples; DP-SGD needs a non-empty train split")
    if privacy.delta >= 1.0 / n_samples:
        logger.warning(
            "delta=%g is not below 1/n_train=%g; the guarantee is weak, use a smaller delta",
            privacy.delta,
            1.0 / n_samples,
        )
    from opacus import PrivacyEngine

    validate_for_dp(model)
    indices = DataLoader(TensorDataset(torch.arange(n_samples)), batch_size=int(batch_size))
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: the pseudo-RNG is seeded on purpose (reproducibility)
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        engine = PrivacyEngine(accountant=privacy.accountant)
        module, dp_optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=indices,
            target_epsilon=privacy.epsilon,
            target_delta=privacy.delta,
            epochs=int(planned_epochs),
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
        )
    logger.info(
        "DP-SGD: epsilon=%g delta=%g over %d epochs -> noise multiplier %.3f, sample rate %.4f",
        privacy.epsilon,
        privacy.delta,
        planned_epochs,
        dp_optimizer.noise_multiplier,
        1.0 / len(indices),
    )
    module.disable_hooks()  # the trainer turns them on around its own steps only
    return PrivateTraining(
        engine=engine,
        module=module,
        optimizer=dp_optimizer,
        data_loader=loader,
        settings=privacy,
        planned_epochs=int(planned_epochs),
    )
