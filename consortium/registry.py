"""The released shared model as an MLflow pyfunc model, registered as ``models:/<consortium>/<version>``.

What a user of the MLflow Model Registry expects: load it with ``mlflow.pyfunc.load_model``, give it a
member's raw data (samples x the panel's features, as the member's ``.h5ad`` holds them) and get one
column per shared endpoint, the trunk and that endpoint's shared head applied to the normalized data.

The model carries the consortium's normalization: for count data, library size to ``target_sum`` and
``log1p`` (per sample), then per-feature centring and scaling clipped to ``max_value``, fitted on the
data being scored, as each member scaled its own data in training (the members' statistics never left
them, so the consortium has no pooled statistics to ship). Score one member's samples per call.
Private endpoints have no head here: they never left their member.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from models.network import SharedModel
from omics.normalize import MAX_VALUE, TARGET_SUM, normalize
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

REGISTERED_ARTIFACT = "consortium_model"
STATE_FILE = "state.npz"
SPEC_FILE = "model.json"


def model_spec(config: ConsortiumConfig) -> dict[str, Any]:
    """Everything besides the weights that scoring needs: network shape, features, endpoints, normalization."""
    t = config.training
    return {
        "consortium": config.name,
        "features": list(config.panel_features()),
        "endpoints": list(config.shared_endpoints()),
        "kinds": {name: info["type"] for name, info in config.endpoints().items() if name in config.shared_endpoints()},
        "network": {"trunk_widths": list(t.trunk_widths), "head_width": t.head_width, "dropout": t.dropout},
        "normalization": {
            "values": config.data.values,
            "target_sum": TARGET_SUM,
            "max_value": MAX_VALUE,
            "scaling": "per feature, fitted on the scored samples (as each member in training)",
        },
    }


def normalize_raw(X: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """A member's raw values as the network saw them in training (:func:`omics.normalize.normalize`)."""
    X = np.asarray(X, dtype=np.float32)
    if X.shape[0] < 2:
        raise ValueError(f"{X.shape[0]} sample(s): scaling is fitted on the scored samples; give at least 2")
    adata = ad.AnnData(X)
    normalize(
        adata,
        values=normalization["values"],
        target_sum=float(normalization["target_sum"]),
        max_value=float(normalization["max_value"]),
    )
    return np.asarray(adata.X, dtype=np.float32)


class ConsortiumModel(PythonModel):
    """Raw panel features in, one column per shared endpoint out (binary: probability; otherwise the
    head's raw output: a risk score for survival, a standardized value for regression)."""

    def load_context(self, context) -> None:
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        net = self.spec["network"]
        self.model = SharedModel(
            len(self.spec["features"]),
            shared_tasks=self.spec["endpoints"],
            trunk_widths=net["trunk_widths"],
            head_width=net["head_width"],
            dropout=net["dropout"],
        )
        with np.load(context.artifacts["state"]) as state:
            self.model.load_state_dict({k: torch.as_tensor(state[k]) for k in state.files})
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        features = self.spec["features"]
        missing = [f for f in features if f not in model_input.columns]
        if missing:
            raise ValueError(
                f"the input lacks {len(missing)} panel feature(s), e.g. {missing[:5]}; give one column per "
                "panel feature (the model signature names them)"
            )
        X = normalize_raw(model_input[features].to_numpy(dtype=np.float32), self.spec["normalization"])
        out = {}
        with torch.no_grad():
            x = torch.as_tensor(X)
            for name in self.spec["endpoints"]:
                value = self.model.forward_task(x, name)
                out[name] = (torch.sigmoid(value) if self.spec["kinds"][name] == "binary" else value).numpy()
        return pd.DataFrame(out, index=model_input.index).astype(np.float64)


def signature(config: ConsortiumConfig) -> ModelSignature:
    """Inputs: one float column per panel feature, by name; outputs: one column per shared endpoint."""
    return ModelSignature(
        inputs=Schema([ColSpec("float", name) for name in config.panel_features()]),
        outputs=Schema([ColSpec("double", name) for name in config.shared_endpoints()]),
    )


def log_registered_model(config: ConsortiumConfig, state: dict[str, np.ndarray], *, folder: Path) -> str | None:
    """Log the pyfunc model in the active run and register it under the consortium's name; returns its
    ``models:/<name>/<version>`` URI, or None for a consortium without shared endpoints (nothing for
    the model to predict). ``folder`` holds the artifact files while they are logged."""
    if not config.shared_endpoints():
        log.warning("consortium %s has no shared endpoint: no model to register (the trunk is logged)", config.name)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / STATE_FILE, **{k: np.asarray(v, dtype=np.float32) for k, v in state.items()})
    (folder / SPEC_FILE).write_text(json.dumps(model_spec(config), indent=2))
    example = pd.DataFrame(
        np.ones((2, len(config.panel_features())), dtype=np.float32), columns=config.panel_features()
    )
    info = mlflow.pyfunc.log_model(
        name=REGISTERED_ARTIFACT,
        python_model=ConsortiumModel(),
        artifacts={"state": str(folder / STATE_FILE), "spec": str(folder / SPEC_FILE)},
        signature=signature(config),
        input_example=example,
        registered_model_name=config.name,
        # explicit: inferring requirements scans the environment for many seconds
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    version = info.registered_model_version
    log.info("registered the shared model as models:/%s/%s", config.name, version)
    return f"models:/{config.name}/{version}"
