"""The multitask network: a federated trunk, shared endpoint heads and private endpoint heads.

The trunk is the attribute ``trunk`` of both :class:`MultitaskNet` and :class:`SharedModel`, and
both build it with :func:`build_trunk`; the heads are ``heads.<task name>`` built by
:func:`build_head` in both. So the server's model and every member's full model agree on the state
keys by construction: :meth:`MultitaskNet.shared_state` (``trunk.*`` plus the parameters of the
heads of shared endpoints) has exactly the keys of ``SharedModel(...).state_dict()``. A private
endpoint's head, and every head's target-scaling buffers (a member's label statistics), never
leave the member.

No BatchNorm anywhere: its running statistics would leak batch composition and it does not give
per-sample gradients, so DP-SGD (Opacus) could not train it. LayerNorm works per sample.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models import data as model_data
from models.data import ScaledRows, TaskSpec

TRUNK_PREFIX = "trunk."
HEAD_PREFIX = "heads."
TASK_KINDS = ("binary", "regression", "survival")


def build_trunk(n_features: int, *, trunk_widths: Sequence[int] = (256, 64), dropout: float = 0.2) -> nn.Sequential:
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
        raise ValueError(f"trunk_widths={tuple(trunk_widths)}; give one or more positive widths, e.g. (256, 64)")
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


def _head_seed(seed: int | None, task: str) -> int | None:
    # A head's initial weights depend on the seed and its task name only, so the server's head of a
    # shared endpoint starts where every member's head of that endpoint starts.
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + zlib.crc32(task.encode())) % 2**63


def _check_task_name(name: str) -> None:
    if not name or "." in name:
        raise ValueError(f"task name '{name}' is empty or holds '.'; rename it (it is a state-dict key part)")


def _build_heads(names: Sequence[str], width_in: int, *, head_width: int, seed: int | None) -> nn.ModuleDict:
    duplicated = sorted({n for n in names if list(names).count(n) > 1})
    if duplicated:
        raise ValueError(f"task names {duplicated} appear more than once; task names must be unique")
    for name in names:
        _check_task_name(name)
    with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG
        heads = nn.ModuleDict({name: build_head(width_in, head_width=head_width) for name in names})
    for name, head in heads.items():
        reset_parameters(head, generator=_generator(_head_seed(seed, name)))
    return heads


class SharedModel(nn.Module):
    """What the FLARE server holds and aggregates: the trunk and the heads of shared endpoints.

    Parameters
    ----------
    n_features
        Input width (the consortium panel size).
    shared_tasks
        Names of the shared endpoints (held by several members under one name and kind); one head
        each. Names, not :class:`~models.data.TaskSpec`, so the server can be built from plain
        configuration.
    trunk_widths, dropout
        Passed to :func:`build_trunk`.
    head_width
        Passed to :func:`build_head`; must equal the members' ``head_width``.
    seed
        Seed of the initial weights; ``None`` draws one.

    Notes
    -----
    ``state_dict()`` keys equal :meth:`MultitaskNet.shared_state` keys of a member model with the
    same widths and shared endpoints. No target-scaling buffers: those stay with the members. With
    the same ``seed``, the initial trunk equals ``MultitaskNet(..., seed=seed).trunk`` and each head
    equals the member's head of the same name.
    """

    def __init__(
        self,
        n_features: int,
        *,
        shared_tasks: Sequence[str] = (),
        trunk_widths: Sequence[int] = (256, 64),
        head_width: int = 32,
        dropout: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(shared_tasks, str):
            raise ValueError(f"shared_tasks='{shared_tasks}' is one string; give a list of task names")
        with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG
            self.trunk = build_trunk(n_features, trunk_widths=trunk_widths, dropout=dropout)
        reset_parameters(self.trunk, generator=_generator(seed))
        width = int(list(trunk_widths)[-1])
        self.heads = _build_heads(list(shared_tasks), width, head_width=head_width, seed=seed)

    @property
    def shared_tasks(self) -> list[str]:
        return list(self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's embedding ``(n, trunk_widths[-1])``; see :meth:`forward_task` for a head."""
        return self.trunk(x)

    def forward_task(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Raw output ``(n,)`` of one shared endpoint's head (no target scaling: that is a member's)."""
        if task not in self.heads:
            raise KeyError(f"no head for shared task '{task}'; this model shares {self.shared_tasks}")
        return self.heads[task](self.trunk(x)).squeeze(-1)


class SharedTrunk(SharedModel):
    """The trunk alone: a :class:`SharedModel` without shared endpoints.

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
        super().__init__(n_features, trunk_widths=trunk_widths, dropout=dropout, seed=seed)


class MultitaskNet(nn.Module):
    """A member's model: the federated trunk plus one head (one output unit) per task.

    Parameters
    ----------
    n_features
        Input width (the consortium panel size).
    tasks
        The member's tasks; one head each, keyed by task name. A task with ``shared=True`` is a
        shared endpoint: its head's parameters are part of :meth:`shared_state`.
    trunk_widths, dropout
        Passed to :func:`build_trunk`.
    head_width
        Hidden width of each head; 0 makes the heads linear.
    seed
        Seed for the initial weights (the trunk, and each head from the seed and its task name);
        ``None`` draws one.

    Notes
    -----
    Each head carries two buffers, ``target_mean`` and ``target_scale``: regression heads are
    trained on standardized targets (train-split statistics, set by the trainer with
    :meth:`set_target_scaling`) and :meth:`predict` maps them back to the original units. The
    buffers are a member's label statistics: they stay private, also on a shared head.
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
        for task in tasks:
            if task.kind not in TASK_KINDS:
                raise ValueError(f"task '{task.name}' has kind '{task.kind}'; use one of {TASK_KINDS}")
        self.n_features = int(n_features)
        self.tasks = tuple(tasks)
        with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG
            self.trunk = build_trunk(n_features, trunk_widths=trunk_widths, dropout=dropout)
        reset_parameters(self.trunk, generator=_generator(seed))
        width = int(list(trunk_widths)[-1])
        self.heads = _build_heads([t.name for t in tasks], width, head_width=head_width, seed=seed)
        for head in self.heads.values():
            head.register_buffer("target_mean", torch.zeros(1))
            head.register_buffer("target_scale", torch.ones(1))

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

    @property
    def shared_tasks(self) -> list[str]:
        """Names of the shared endpoints, in task order."""
        return [t.name for t in self.tasks if t.shared]

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trunk's tensors, keys ``trunk.*`` only."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(TRUNK_PREFIX)}

    def shared_keys(self) -> list[str]:
        """Keys of :meth:`shared_state`: ``trunk.*``, then the parameters of shared heads.

        Never a private endpoint's head and never a ``target_mean``/``target_scale`` buffer.
        """
        shared_params = {
            f"{HEAD_PREFIX}{name}.{key}" for name in self.shared_tasks for key, _ in self.heads[name].named_parameters()
        }
        return [k for k in self.state_dict() if k.startswith(TRUNK_PREFIX) or k in shared_params]

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors that are aggregated across members: see :meth:`shared_keys`.

        Equals :meth:`trunk_state` when no task is shared.
        """
        keys = set(self.shared_keys())
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in keys}

    def head_state(self) -> dict[str, torch.Tensor]:
        """Copies of all heads' tensors (``heads.*``), including the target scaling."""
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
        expected = [k for k in self.state_dict() if k.startswith(TRUNK_PREFIX)]
        self._load_in_place(state, expected, caller="load_trunk_state", part="trunk")

    def load_shared_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Copy a shared state (e.g. the federated average) into the trunk and shared heads, in place.

        In-place copies keep the parameter objects, so an optimizer (and an Opacus wrapper) built
        on this model keeps working. Private heads and all target-scaling buffers are never touched.

        Parameters
        ----------
        state
            Exactly the keys of :meth:`shared_keys` (tensors or numpy arrays).

        Raises
        ------
        ValueError
            If keys are missing or unexpected (named in the message; a private head's key or a
            target-scaling buffer is called out as such) or a shape differs. Nothing is copied then.
        """
        self._load_in_place(state, self.shared_keys(), caller="load_shared_state", part="shared")

    def _load_in_place(
        self, state: Mapping[str, torch.Tensor | np.ndarray], expected: Sequence[str], *, caller: str, part: str
    ) -> None:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{caller}: missing {part} keys {missing}, unexpected keys {unexpected}."
                f"{self._unexpected_hint(unexpected, send=f'model.{part}_state()')}"
            )
        own = self.state_dict(keep_vars=True)
        values = {k: state[k] if torch.is_tensor(state[k]) else torch.as_tensor(np.asarray(state[k])) for k in expected}
        for key, value in values.items():  # check every shape before copying anything
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{caller}: '{key}' has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(own[key].shape)}; check trunk_widths, head_width and the feature panel"
                )
        with torch.no_grad():
            for key, value in values.items():
                own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))

    def _unexpected_hint(self, unexpected: Sequence[str], *, send: str) -> str:
        hints = []
        if any(k.startswith("_module.") for k in unexpected):
            hints.append("Keys start with '_module.': take the state from trainer.model, not Opacus' wrapper.")
        head_keys = [k for k in unexpected if k.startswith(HEAD_PREFIX)]
        private = sorted({k.split(".")[1] for k in head_keys} & (set(self.heads) - set(self.shared_tasks)))
        if private:
            hints.append(
                f"Head keys are private for tasks {private}: head keys of private endpoints never travel; "
                f"send only {send}."
            )
        if any(k.endswith((".target_mean", ".target_scale")) for k in unexpected):
            hints.append("target_mean/target_scale are a member's label statistics and never travel.")
        if head_keys and not hints:
            hints.append(f"Head keys are private unless their task is shared; send only {send}.")
        return "".join(f" {h}" for h in hints)

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
    def predict(
        self, x: np.ndarray | torch.Tensor | ScaledRows, *, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Per task ``(n,)`` predictions in eval mode.

        Binary: logits; regression: values in the original target units; survival: log-risk
        (higher means shorter expected survival). The module's train/eval mode is restored.
        """
        batch_size = model_data.ROW_BLOCK if batch_size is None else int(batch_size)
        if isinstance(x, ScaledRows):  # a sparse member's rows: scaled and made dense one block at a time
            if x.shape[1] != self.n_features:
                raise ValueError(f"predict: X has shape {x.shape}; expected (n, {self.n_features})")
            blocks = (torch.from_numpy(block) for block in x.blocks(batch_size))
        else:
            x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
            if x.ndim != 2 or x.shape[1] != self.n_features:
                raise ValueError(f"predict: X has shape {tuple(x.shape)}; expected (n, {self.n_features})")
            blocks = (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))
        was_training = self.training
        self.eval()
        try:
            chunks = [self(block) for block in blocks]
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
