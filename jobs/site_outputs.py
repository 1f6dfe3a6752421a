"""What a member site keeps for itself: its final model and its test predictions. Never sent.

One folder per site (``<root>/<site name>/``)::

    model.pt          the member's final trunk, shared heads and private heads (a torch checkpoint)
    predictions.npz   per endpoint, the test split's predictions and labels (for the member's own
                      analyses, and for benchmark runs where one machine holds every member's data)
    scaling.json      the fixed preprocessing the member trained with and scores with: per panel feature
                      its training-split mean and SD (after library size + log1p), which features it
                      measures, and each regression endpoint's target mean and SD (``consortium score``)
    round-<r>.pt      the trainer after round r (network with private heads, optimizer, RNG stream, DP
                      accountant): what an interrupted federation continues from (the last two kept)
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schema.writes import atomic_write, writing

MODEL_FILE = "model.pt"
PREDICTIONS_FILE = "predictions.npz"
SCALING_FILE = "scaling.json"
CHECKPOINT_PATTERN = "round-*.pt"
CHECKPOINTS_KEPT = 2  # a round in flight when the server died may have saved its own: keep the one before


def site_folder(root: str | Path, site: str) -> Path:
    """The outputs folder of ``site`` under a run's ``root``."""
    return Path(root) / site


class SiteOutputs:
    """Writer for one site's private outputs folder; creates it on first use."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def predictions_path(self) -> Path:
        return self.folder / PREDICTIONS_FILE

    def save_model(self, model: torch.nn.Module, *, info: Mapping[str, Any]) -> Path:
        """Write the full state with what is needed to rebuild the network (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.model_path, _torch_bytes({"state_dict": model.state_dict(), **info}))
        return self.model_path

    def save_checkpoint(self, state: Mapping[str, Any], *, round_: int) -> Path:
        """Write the trainer's state after ``round_`` (atomically); older checkpoints beyond the last
        :data:`CHECKPOINTS_KEPT` are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{int(round_)}.pt"
        atomic_write(path, _torch_bytes(dict(state)))
        kept = self.checkpoints()
        for old in sorted(kept, reverse=True)[CHECKPOINTS_KEPT:]:
            kept[old].unlink(missing_ok=True)
        return path

    def checkpoints(self) -> dict[int, Path]:
        """The kept trainer checkpoints by round."""
        found = {}
        for path in self.folder.glob(CHECKPOINT_PATTERN):
            number = path.stem.removeprefix("round-")
            if number.isdigit():
                found[int(number)] = path
        return found

    def load_checkpoint(self, *, round_: int) -> dict[str, Any] | None:
        """The trainer's state saved after ``round_``, or ``None`` when this site kept none for it."""
        path = self.checkpoints().get(int(round_))
        return None if path is None else torch.load(path, weights_only=True)

    @property
    def scaling_path(self) -> Path:
        return self.folder / SCALING_FILE

    def save_scaling(self, scaling: Mapping[str, Any], *, targets: Mapping[str, tuple[float, float]]) -> Path:
        """Write the member's fixed preprocessing (:func:`omics.prepare.panel_scaling`) and its regression
        endpoints' target ``(mean, scale)`` (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {**scaling, "targets": {k: {"mean": m, "scale": s} for k, (m, s) in targets.items()}}
        atomic_write(self.scaling_path, (json.dumps(record, indent=1) + "\n").encode())
        return self.scaling_path

    def save_predictions(self, predictions: Mapping[str, np.ndarray], *, targets: Mapping[str, np.ndarray]) -> Path:
        """Write ``prediction/<task>`` and ``target/<task>`` arrays of the test split (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"prediction/{k}": np.asarray(v) for k, v in predictions.items()}
        arrays.update({f"target/{k}": np.asarray(v) for k, v in targets.items()})
        with writing(self.predictions_path) as temp:
            np.savez(temp, **arrays)
        return self.predictions_path


def _torch_bytes(obj: Any) -> bytes:
    """``torch.save`` in memory: written to a file, a full disk reads "PytorchStreamWriter failed"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_scaling(path: str | Path) -> dict[str, Any]:
    """A site's ``scaling.json``, checked; ``ValueError`` naming the file and the fix when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / SCALING_FILE
    try:
        scaling = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no such scaling file; a member's site folder holds one after a run (sites/<member>/"
            f"{SCALING_FILE})"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable scaling file ({exc})") from None
    keys = ("features", "measured", "mean", "std", "values", "target_sum", "max_value")
    absent = [k for k in keys if k not in scaling]
    n = len(scaling.get("features", []))
    if absent or any(len(scaling[k]) != n for k in ("measured", "mean", "std")):
        lacks = absent or "matching lengths"
        raise ValueError(f"{path}: not a site's scaling file (lacks {lacks}); use sites/<member>/{SCALING_FILE}")
    if not all(math.isfinite(v) for k in ("mean", "std") for v in scaling[k]):
        raise ValueError(f"{path}: non-finite statistics; rerun the job that wrote it")
    return scaling


def read_predictions(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{"prediction": {task: array}, "target": {task: array}}`` of one site folder."""
    out: dict[str, dict[str, np.ndarray]] = {"prediction": {}, "target": {}}
    with np.load(Path(folder) / PREDICTIONS_FILE) as data:
        for key in data.files:
            kind, task = key.split("/", 1)
            out[kind][task] = data[key]
    return out
