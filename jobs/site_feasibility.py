"""What a member site runs in the ``consortium feasibility`` job: one round, no training.

The site reads the protocol itself (:func:`schema.protocol.load_protocol`: parsed, never evaluated),
counts it on its own obs (:func:`omics.feasibility.count_feasibility`) and sends the count vector as
the sum section ``feasibility.protocol.counts`` (encrypted by the member's filter under HE, so the
server only adds ciphertexts). Its published record names the layout's digest, so the operator can
check that every member counted the same protocol; only in a plaintext job (``publish_counts``, where
the operator reads every update anyway) does it hold the member's own counts too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from jobs.sections import PUBLISHED_META, weighted_update
from omics.feasibility import count_feasibility, feasibility_layout
from schema.config import ConsortiumConfig
from schema.errors import ConfigError
from schema.names import KEY_METRIC
from schema.protocol import load_protocol

log = logging.getLogger(__name__)

COUNTS_KEY = "feasibility.protocol.counts"
STEPS_META = "NUM_STEPS_CURRENT_ROUND"  # as jobs.site sends it


def member_obs(path: Path, *, sample_column: str | None = None) -> pd.DataFrame:
    """A member file's obs only (the matrix is not read). A single-cell member (``sample_column``) has one
    row a cell: its patients are its samples, each counted once from its first cell's row."""
    adata = ad.read_h5ad(path, backed="r")
    try:
        obs = adata.obs.copy()
    finally:
        adata.file.close()
    if sample_column is None:
        return obs
    if sample_column not in obs.columns:
        raise ConfigError(f"{path}: no obs column {sample_column!r} (the member's sample_column); fix the config")
    return obs.drop_duplicates(subset=sample_column, keep="first")


class FeasibilitySite:
    """Counts ``protocol`` on the member's obs and answers the job's round with the count vector."""

    def __init__(self, config: ConsortiumConfig, member: str, *, protocol: Path, publish_counts: bool = False) -> None:
        self.config = config
        self.member = config.member(member).name
        self.protocol = load_protocol(protocol)
        self.layout = feasibility_layout(self.protocol)
        self.publish_counts = publish_counts
        data, samples = config.member(member).data, config.member(member).sample_column
        self.counts = count_feasibility(member_obs(data, sample_column=samples), self.protocol, path=str(data))
        eligible = self.counts[len(self.protocol.criteria)]
        log.info("site %s: %d screened, %d eligible", self.member, self.counts[0], eligible)

    def train_round(self, received: FLModel) -> FLModel:
        started = time.perf_counter()
        published: dict[str, Any] = {
            "round": int(received.current_round or 0),
            "total_rounds": int(received.total_rounds or 1),
            "feasibility": True,
            "layout_digest": self.layout.digest(),
            "seconds": time.perf_counter() - started,
            "finished_at": time.time(),
        }
        if self.publish_counts:
            published["counts"] = [int(v) for v in self.counts]
        update, meta = weighted_update({COUNTS_KEY: self.counts.astype(np.float64)}, weights={})
        meta[PUBLISHED_META] = published
        meta[STEPS_META] = 1
        return FLModel(
            params={k: torch.from_numpy(v) for k, v in update.items()},
            params_type=ParamsType.FULL,
            metrics={KEY_METRIC: 0.0},
            current_round=published["round"],
            meta=meta,
        )
