"""The shared trunk at the end of a run, and its release to MLflow with the biomarker table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from consortium.config import ConsortiumConfig
from jobs.runner import FederatedRun
from models.network import SharedTrunk

log = logging.getLogger(__name__)

MODEL_NAME = "shared_trunk"


def ensure_experiment(config: ConsortiumConfig, *, tracking_uri: str) -> str:
    """The run's MLflow experiment; with a local SQLite store its artifacts go next to the database.

    (MLflow's default for a SQLite store is ``./mlruns`` in the current directory.)
    """
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.resolve().as_uri()
    return mlflow.create_experiment(
        config.tracking.experiment, artifact_location=location, tags={"consortium": config.name}
    )


def shared_trunk_state(config: ConsortiumConfig, run: FederatedRun) -> dict[str, torch.Tensor]:
    """The final aggregated trunk, as the server persisted it (plaintext runs) or decrypted by a member (HE)."""
    if run.he:
        from jobs.he.release import decrypt_global_trunk

        return decrypt_global_trunk(config, run)
    if run.global_model is None:
        raise FileNotFoundError(f"job {run.job_id}: the server left no global model under {run.result_dir}")
    saved = torch.load(run.global_model, map_location="cpu", weights_only=False)
    state = saved.get("model", saved) if isinstance(saved, dict) else saved
    return {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}


def trunk_module(config: ConsortiumConfig, state: dict[str, torch.Tensor]) -> SharedTrunk:
    t = config.training
    model = SharedTrunk(len(config.panel_features()), trunk_widths=list(t.trunk_widths), dropout=t.dropout)
    model.load_state_dict(state)
    return model.eval()


def log_shared_model(
    config: ConsortiumConfig,
    state: dict[str, torch.Tensor],
    *,
    consensus: pd.DataFrame,
    report: dict[str, Any],
    tracking_uri: str,
) -> str:
    """Log the shared trunk as an MLflow model, with the consensus biomarker table and the report."""
    experiment_id = ensure_experiment(config, tracking_uri=tracking_uri)
    model = trunk_module(config, state)
    with mlflow.start_run(experiment_id=experiment_id, run_name="shared-trunk") as run:
        mlflow.set_tags(
            {
                "consortium": config.name,
                "job_id": report["job_id"],
                "kind": "shared-model",
                "he": "on" if report["privacy"]["he"] else "off",
                "dp": "on" if report["privacy"]["dp"] else "off",
            }
        )
        mlflow.log_params(
            {
                "rounds": report["timing"]["rounds"],
                "members": len(config.members),
                "n_features": len(config.panel_features()),
                "trunk_widths": ",".join(map(str, config.training.trunk_widths)),
                "local_epochs": config.training.local_epochs,
                "env": report["env"],
            }
        )
        for info in report["members"].values():
            for task, entry in info["tasks"].items():
                for kind in ("federated", "local", "pooled"):
                    value = entry.get(kind)
                    if value is not None and np.isfinite(value):
                        mlflow.log_metric(f"{kind}/{task}/{entry['metric']}", float(value))
        n_features = len(config.panel_features())
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_features))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config.training.trunk_widths[-1]))]),
        )
        # pt2 (a traced graph) rather than pickle: loading it runs no code from the publisher.
        # Explicit requirements: inferring them scans the environment for many seconds.
        mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            signature=signature,
            serialization_format="pt2",
            input_example=np.zeros((2, n_features), dtype=np.float32),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        mlflow.log_text(consensus.to_csv(index=False), "biomarkers/consensus.csv")
        for task, rows in report["biomarkers"]["tasks"].items():
            mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), f"biomarkers/{task}.csv")
        mlflow.log_text(json.dumps(report, indent=2, default=str), "report.json")
        log.info("logged the shared trunk to MLflow run %s", run.info.run_id)
        return run.info.run_id
