"""The multitask network: a shared (federated) trunk and private task heads.

The trunk is the attribute ``trunk`` of both :class:`MultitaskNet` and :class:`SharedTrunk`, and
both build it with :func:`build_trunk`, so the server's trunk-only model and every member's full
model agree on the state keys (all of them start with ``trunk.``) by construction.
Heads live under ``heads.<task name>.`` and are never part of :meth:`MultitaskNet.trunk_state`.

No BatchNorm anywhere: its running statistics would leak batch composition and it does not give
per-sample gradients, so DP-SGD (Opacus) could not train it. LayerNorm works per sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.data import TaskSpec

TRUNK_PREFIX = "trunk."
HEAD_PREFIX = "heads."
TASK_KINDS = ("binary", "regression", "survival")


def build_trunk(
    n_features: int, *, trunk_widths: Sequence[int] = (256, 64), dropout: float = 0.2
) -> nn.Sequential:
    """The shared trunk: per width ``Linear -> LayerNorm -> ReLU -> Dropout``.

    Parameters
    ----------
    n_features
        Input width (the consortium panel size).
    trunk_widths
        Output width of each block; the last one is the embedding the heads read.
    dropout
        Dropout probability after each block, in ``[0, 1)``.

    Returns
    -------
    torch.nn.Sequential
        The trunk, with keys ``<4 * block + layer>.<param>``.
    """
    widths = [int(w) for w in trunk_widths]
    if int(n_features) < 1:
        raise ValueError(f"n_features={n_features}; the trunk needs at least one input feature")
    if not widths or min(widths) < 1:
        raise ValueError(
            f"trunk_widths={tuple(trunk_widths)}; give one or more positive widths, e.g. (256, 64)"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}; use a probability in [0, 1)")
    layers: list[nn.Module] = []
    width_in = int(n_features)
    for width in widths:
        layers += [nn.Linear(width_in, width), nn.LayerNorm(width), nn.ReLU(), nn.Dropout(dropout)]
        width_in = width
    return nn.Sequential(*layers)


def build_head(width_in: int, *, head_width: int = 32) -> nn.Sequential:
    """A task head with one output unit; ``head_width=0`` gives a linear head."""
    if head_width < 0:
        raise ValueError(f"head_width={head_width}; use 0 for a linear head or a positive width")
    if head_width == 0:
        return nn.Sequential(nn.Linear(width_in, 1))
    return nn.Sequential(nn.Linear(width_in, head_width), nn.ReLU(), nn.Linear(head_width, 1))


def reset_parameters(module: nn.Module, *, generator: torch.Generator) -> None:
    """Re-initialize every Linear and LayerNorm in ``module`` from ``generator``.

    Same distributions as PyTorch's defaults, but drawn from an explicit generator so a seed fixes
    the weights without touching the global RNG.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # non-deterministic, and leaves the global RNG alone
    else:
        generator.manual_seed(int(seed))
    return generator


class SharedTrunk(nn.Module):
    """The trunk alone: what the FLARE server holds and averages.

    Its ``state_dict()`` keys equal :meth:`MultitaskNet.trunk_state` keys, and with the same
    ``seed`` its initial weights equal those of ``MultitaskNet(..., seed=seed).trunk``.
    """

    def __init__(
        self,
        n_features: int,
        *,
        trunk_widths: Sequence[int] = (256, 64),
        dropout: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG
            self.trunk = build_trunk(n_features, trunk_widths=trunk_widths, dropout=dropout)
        reset_parameters(self.trunk, generator=_generator(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class MultitaskNet(nn.Module):
    """Shared trunk plus one private head (one output unit) per task.

    Parameters
    ----------
    n_features
        Input width (the consortium panel size).
    tasks
        The member's tasks; one head each, keyed by task name.
    trunk_widths, dropout
        Passed to :func:`build_trunk`.
    head_width
        Hidden width of each head; 0 makes the heads linear.
    seed
        Seed for the initial weights (trunk first, then heads in task order); ``None`` draws one.

    Notes
    -----
    Each head carries two buffers, ``target_mean`` and ``target_scale``: regression heads are
    trained on standardized targets (train-split statistics, set by the trainer with
    :meth:`set_target_scaling`) and :meth:`predict` maps them back to the original units. The
    buffers belong to the head, so they stay private with it.
    """

    def __init__(
        self,
        n_features: int,
        tasks: Sequence[TaskSpec],
        *,
        trunk_widths: Sequence[int] = (256, 64),
        head_width: int = 32,
        dropout: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks is empty; a MultitaskNet needs at least one TaskSpec")
        names = [t.name for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task names {duplicated} appear more than once; task names must be unique")
        for task in tasks:
            if task.kind not in TASK_KINDS:
                raise ValueError(f"task '{task.name}' has kind '{task.kind}'; use one of {TASK_KINDS}")
            if "." in task.name or not task.name:
                raise ValueError(
                    f"task name '{task.name}' is empty or holds '.'; rename it (it is a state-dict key part)"
                )
        self.n_features = int(n_features)
        self.tasks = tuple(tasks)
        with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG
            self.trunk = build_trunk(n_features, trunk_widths=trunk_widths, dropout=dropout)
            width = int(list(trunk_widths)[-1])
            self.heads = nn.ModuleDict({t.name: build_head(width, head_width=head_width) for t in tasks})
        for head in self.heads.values():
            head.register_buffer("target_mean", torch.zeros(1))
            head.register_buffer("target_scale", torch.ones(1))
        generator = _generator(seed)
        reset_parameters(self.trunk, generator=generator)
        reset_parameters(self.heads, generator=generator)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs per task, each ``(n,)``: logits, standardized values or log-risks."""
        embedding = self.trunk(x)
        return {name: head(embedding).squeeze(-1) for name, head in self.heads.items()}

    def forward_task(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Raw output ``(n,)`` of one task, through the trunk and that head only."""
        if task not in self.heads:
            raise KeyError(f"no head for task '{task}'; this model has {self.task_names}")
        return self.heads[task](self.trunk(x)).squeeze(-1)

    # -- separable state -------------------------------------------------------------------------

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trunk's tensors, keys ``trunk.*`` only: the part that is federated."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(TRUNK_PREFIX)}

    def head_state(self) -> dict[str, torch.Tensor]:
        """Copies of the heads' tensors (``heads.*``), including the target scaling: never shared."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}

    def load_trunk_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Copy a trunk state (e.g. the federated average) into the trunk, in place.

        In-place copies keep the parameter objects, so an optimizer (and an Opacus wrapper) built
        on this model keeps working. Heads are never touched.

        Raises
        ------
        ValueError
            If keys are missing or unexpected (named in the message) or a shape differs.
        """
        expected = {k: v for k, v in self.state_dict().items() if k.startswith(TRUNK_PREFIX)}
        given = set(state)
        missing = sorted(set(expected) - given)
        unexpected = sorted(given - set(expected))
        if missing or unexpected:
            hint = ""
            if any(k.startswith("_module.") for k in unexpected):
                hint = " Keys start with '_module.': take the state from trainer.model, not Opacus' wrapper."
            elif any(k.startswith(HEAD_PREFIX) for k in unexpected):
                hint = " Head keys are private; send only model.trunk_state()."
            raise ValueError(
                f"load_trunk_state: missing trunk keys {missing}, unexpected keys {unexpected}.{hint}"
            )
        with torch.no_grad():
            for key, target in expected.items():
                value = state[key] if torch.is_tensor(state[key]) else torch.as_tensor(np.asarray(state[key]))
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"load_trunk_state: '{key}' has shape {tuple(value.shape)}, the model expects "
                        f"{tuple(target.shape)}; check trunk_widths and the feature panel"
                    )
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    # -- target scaling and prediction -----------------------------------------------------------

    def set_target_scaling(self, task: str, *, mean: float, scale: float) -> None:
        """Store a regression head's train-split mean and standard deviation."""
        if not math.isfinite(mean) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"task '{task}': target scaling mean={mean}, scale={scale}; need finite values and scale > 0"
            )
        head = self.heads[task]
        head.target_mean.fill_(float(mean))
        head.target_scale.fill_(float(scale))

    def target_scaling(self, task: str) -> tuple[float, float]:
        """``(mean, scale)`` of a head's targets; ``(0, 1)`` for non-regression heads."""
        head = self.heads[task]
        return float(head.target_mean.item()), float(head.target_scale.item())

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor, *, batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Per task ``(n,)`` predictions in eval mode.

        Binary: logits; regression: values in the original target units; survival: log-risk
        (higher means shorter expected survival). The module's train/eval mode is restored.
        """
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"predict: X has shape {tuple(x.shape)}; expected (n, {self.n_features})")
        was_training = self.training
        self.eval()
        try:
            chunks = [self(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        out: dict[str, np.ndarray] = {}
        for task in self.tasks:
            values = torch.cat([c[task.name] for c in chunks]).double().numpy() if chunks else np.zeros(0)
            if task.kind == "regression":
                mean, scale = self.target_scaling(task.name)
                values = values * scale + mean
            out[task.name] = values
        return out
