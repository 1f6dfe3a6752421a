"""What a member site writes during a federated run, and how the run folder reads it back.

One folder per site (``<root>/<site name>/``)::

    metrics.jsonl           one JSON object per round (:class:`RoundRecord`), appended as rounds finish
    model.pt                the member's final trunk + private heads; it never leaves the site
    biomarkers_<task>.csv   feature, score, rank: attribution of the task's head back to the panel

The files are plain (JSON lines, CSV, a torch checkpoint) so the CLI, ``report.json`` and the
notebooks read them without FLARE.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.pt"
RANKING_PREFIX = "biomarkers_"
OUTPUTS_ENV = "CONSORTIUM_SITE_OUTPUTS"

Scores = dict[str, dict[str, float]]


@dataclass
class RoundRecord:
    """One site's figures for one federated round (``round`` counts from 0)."""

    site: str
    round: int
    total_rounds: int
    seconds: float
    steps: int
    train_loss: float
    val: Scores
    test: Scores
    bytes_sent: int
    epsilon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        """Finite figures under MLflow-safe keys: ``train_loss``, ``val/<task>/<metric>``, ..."""
        flat = {"train_loss": self.train_loss, "bytes_sent": float(self.bytes_sent), "seconds": self.seconds}
        if self.epsilon is not None:
            flat["epsilon"] = self.epsilon
        for split, scores in (("val", self.val), ("test", self.test)):
            for task, metrics in scores.items():
                flat.update({f"{split}/{task}/{name}": value for name, value in metrics.items()})
        return {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(float(v))}


def site_folder(root: str | Path, site: str) -> Path:
    """The outputs folder of ``site`` under a run's ``root``."""
    return Path(root) / site


class SiteOutputs:
    """Writer for one site's outputs folder; creates it on first use."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    def ranking_path(self, task: str) -> Path:
        return self.folder / f"{RANKING_PREFIX}{task}.csv"

    def start(self) -> None:
        """Begin a run: create the folder and forget the metrics of an earlier run in it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path.unlink(missing_ok=True)

    def append_round(self, record: RoundRecord) -> None:
        """Append one round; flushed and synced, so a reader tailing the file sees whole lines."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(json_safe(asdict(record)), allow_nan=False)
        with self.metrics_path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_model(self, model: torch.nn.Module, *, info: Mapping[str, Any]) -> Path:
        """Write the full state (trunk + heads) with what is needed to rebuild the network."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.model_path.with_suffix(".pt.partial")
        torch.save({"state_dict": model.state_dict(), **info}, partial)
        partial.replace(self.model_path)  # a reader never sees a half-written checkpoint
        return self.model_path

    def write_ranking(self, task: str, table: pd.DataFrame) -> Path:
        """Write one task's biomarker ranking (columns ``feature, score, rank``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.ranking_path(task)
        table.loc[:, ["feature", "score", "rank"]].to_csv(path, index=False)
        return path


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The round records of one site folder, in order; ``[]`` if none was written yet.

    A last line still being written (no trailing newline) is skipped rather than failing.
    """
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            records.append(json.loads(line))
    return records


def read_rankings(folder: str | Path) -> dict[str, pd.DataFrame]:
    """Per task, the ranking table a site wrote."""
    return {
        path.stem.removeprefix(RANKING_PREFIX): pd.read_csv(path)
        for path in sorted(Path(folder).glob(f"{RANKING_PREFIX}*.csv"))
    }


def json_safe(value: Any) -> Any:
    """NaN and inf become ``null``, recursively: metrics.jsonl and report.json stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
