"""The shared model at the end of a run (trunk and shared heads), released to MLflow with the biomarker tables.

One MLflow run per release (``kind=shared-model``): the trunk as a PyTorch model, the scoring model
registered as ``models:/<consortium>/<version>`` (:mod:`consortium.registry`), the biomarker tables and
the report; for a job on provisioned kits, one nested run per member with what it published.
"""

from __future__ import annotations

import json
import logging
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from consortium.registry import log_registered_model
from consortium.results import Released
from jobs.recipe import server_model
from models.network import SharedModel
from schema.config import ConsortiumConfig
from schema.errors import UserError

log = logging.getLogger(__name__)

MODEL_NAME = "shared_model"


def ensure_experiment(config: ConsortiumConfig, *, tracking_uri: str) -> str:
    """The run's MLflow experiment; with a local SQLite store its artifacts go next to the database.

    (MLflow's default for a SQLite store is ``./mlruns`` in the current directory.) With a tracking
    server the server places the artifacts (proxied by default); one that does not answer is a
    :class:`UserError` before anything runs, not MLflow's minutes of retries.
    """
    if tracking_uri.startswith(("http://", "https://")):
        check_tracking_server(tracking_uri)
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


def check_tracking_server(uri: str, *, timeout: float = 10.0) -> None:
    """``UserError`` naming ``tracking.uri`` unless something answers HTTP at ``uri`` (any status: a server
    behind a proxy that wants credentials answers too; MLflow then says what it lacks)."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking.uri = {uri}: no MLflow tracking server answers there ({reason}); start it (mlflow server "
            "--host HOST --port PORT ...), check that this machine reaches it, or leave tracking.uri out "
            "(mlflow.db in the run folder)"
        ) from None


def tracking_uri_for(config: ConsortiumConfig, *, out: Path) -> str:
    """``tracking.uri`` from consortium.yaml, else a SQLite store in the run folder."""
    return config.tracking.uri or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def shared_module(config: ConsortiumConfig, state: dict[str, np.ndarray]) -> SharedModel:
    model = SharedModel(**server_model(config)["args"])
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    return model.eval()


def log_shared_model(
    config: ConsortiumConfig,
    released: Released,
    *,
    report: dict[str, Any],
    tracking_uri: str,
    member_records: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """Log the shared model as an MLflow model, register it, with the biomarker tables and the report.

    ``member_records``: what each member published, by member (:class:`consortium.results.JobResults`);
    each becomes a run nested under this one (for kits, whose member runs are in the server's store).
    ``report["tracking"]["registered_model"]`` gets the registered model's URI.
    """
    experiment_id = ensure_experiment(config, tracking_uri=tracking_uri)
    model = shared_module(config, released.state)
    with mlflow.start_run(experiment_id=experiment_id, run_name="shared-model") as run:
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
                "n_features": len(config.model_features()),
                "trunk_widths": ",".join(map(str, config.training.trunk_widths)),
                "local_epochs": config.training.local_epochs,
                "env": report["env"],
            }
        )
        for info in report["members"].values():
            for task, entry in info["tasks"].items():
                for kind in ("federated", "local", "pooled", "linear_pooled"):
                    value = entry.get(kind)
                    if isinstance(value, float) and np.isfinite(value):
                        mlflow.log_metric(f"{kind}/{task}/{entry['metric']}", float(value))
        n_features = len(config.model_features())
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
        with tempfile.TemporaryDirectory(prefix="consortium-model-") as folder:
            report["tracking"]["registered_model"] = log_registered_model(
                config, released.state, folder=Path(folder), pooled=released.scaling
            )
        for member, records in (member_records or {}).items():
            _log_member_run(config, member, records, experiment_id=experiment_id, job_id=report["job_id"])
        for name, table in released.statistics.items():
            mlflow.log_text(table.to_csv(index=False), f"biomarkers/statistics_{name}.csv")
        for name, table in released.rankings.items():
            mlflow.log_text(table.to_csv(index=False), f"biomarkers/model_{name}.csv")
        mlflow.log_text(json.dumps(report, indent=2, default=str), "report.json")
        log.info("logged the shared trunk to MLflow run %s", run.info.run_id)
        return run.info.run_id


def _log_member_run(
    config: ConsortiumConfig, member: str, records: list[dict[str, Any]], *, experiment_id: str, job_id: str
) -> None:
    """A member's run nested under the release: its parameters, per-round figures and published records."""
    info = config.member(member)
    with mlflow.start_run(experiment_id=experiment_id, run_name=member, nested=True):
        mlflow.set_tags({"consortium": config.name, "job_id": job_id, "kind": "member", "member": member})
        params: dict[str, Any] = {"member": member, "org": info.org, "tasks": ",".join(t.name for t in info.tasks)}
        last = records[-1] if records else {}
        params |= {f"samples_{k}": v for k, v in (last.get("samples") or {}).items()}
        mlflow.log_params(params)
        for record in records:
            step = int(record.get("round") or 0)
            metrics = {"train_loss": record.get("train_loss")}
            for split in ("val", "test"):
                for task, figures in (record.get(split) or {}).items():
                    metrics |= {f"{split}/{task}/{k}": v for k, v in figures.items() if k not in ("ci", "n")}
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)}
            mlflow.log_metrics(finite, step=step)
        mlflow.log_text("".join(json.dumps(r) + "\n" for r in records), f"published/{member}.jsonl")
