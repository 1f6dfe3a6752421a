"""The released shared model as an MLflow pyfunc model, registered as ``models:/<consortium>/<version>``.

What a user of the MLflow Model Registry expects: load it with ``mlflow.pyfunc.load_model``, give it a
member's raw data (samples x the panel's features, as the member's ``.h5ad`` holds them) and get one
column per shared endpoint, the trunk and that endpoint's shared head applied to the normalized data.

The preprocessing is fixed, so a sample's answer depends on that sample alone, never on the others
scored with it: for count data library size to ``target_sum`` and ``log1p`` (per sample), then each
feature centred and scaled with the **scoring member's own training-split mean and SD**, the statistics
it trained with (``scaling.json`` in its site folder, :mod:`jobs.site_outputs`; they never leave the
member), clipped to ``max_value``. Give that file as the ``scaling`` parameter
(``predict(frame, params={"scaling": path})``; over REST, ``"params": {"scaling": path}``).
Why the member's own statistics: every member trained on its data scaled with its own training
statistics, which also removes its batch shift per feature; the heads learned that space, so the
member's own statistics put its new samples where the model saw its training samples (pooled ones would
shift every member whose batch differs from the pool's average). A scorer with no statistics of its own
(no ``scaling`` parameter) gets the consortium's **pooled** training statistics, which the model
carries: the members' per-feature n, sum and sum of squares over their training splits (and a shared
regression endpoint's labels), summed like every other statistic (under HE when it is on), never one
member's figures.

Outputs, per shared endpoint: binary, a probability; regression, the value in the target's units (the
member's own target scaling from the same file; an endpoint the member does not hold has none and is
left out); survival, the risk score (log relative hazard; higher: shorter expected survival).
Private endpoints have no head here: they never left their member.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from jobs.site_outputs import SCALING_FILE, read_scaling
from models.network import SharedModel
from omics.clinical import encode_clinical, filled
from omics.errors import ContractError
from omics.layout import strip_ensembl_versions
from omics.normalize import MAX_VALUE, TARGET_SUM, log_values, scale_features
from schema.clinical import ClinicalFeature, input_kinds
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

REGISTERED_ARTIFACT = "consortium_model"
STATE_FILE = "state.npz"
SPEC_FILE = "model.json"
LIBRARY_SIZE = "library_size"
"""Optional input column: each sample's total counts over all the features of its file (training
normalized by them); without it, the sum over the panel features the member measures."""
SCALING_PARAM = "scaling"


class ScoringInputError(ValueError):
    """Input the model cannot score; the message names the column or value and the fix."""


def model_spec(config: ConsortiumConfig) -> dict[str, Any]:
    """Everything besides the weights that scoring needs: network shape, features, endpoints, normalization."""
    t = config.training
    return {
        "consortium": config.name,
        "features": list(config.panel_features()),  # the omics panel, read from the input by identifier
        "clinical": [c.model_dump(mode="json", exclude_none=True) for c in config.panel.clinical],
        "inputs": list(config.model_features()),  # the network's inputs: the panel, then the clinical inputs
        "endpoints": list(config.shared_endpoints()),
        "kinds": {name: info["type"] for name, info in config.endpoints().items() if name in config.shared_endpoints()},
        "network": {"trunk_widths": list(t.trunk_widths), "head_width": t.head_width, "dropout": t.dropout},
        "normalization": {
            "values": config.data.values,
            "target_sum": TARGET_SUM,
            "max_value": MAX_VALUE,
            "scaling": f"per feature, the scoring member's training-split mean and SD (its {SCALING_FILE}); "
            "without one, the members' training splits pooled (pooled_scaling)",
        },
    }


def pooled_scaling(sums: Mapping[str, np.ndarray], *, config: ConsortiumConfig) -> dict[str, Any] | None:
    """The consortium's pooled scaling from the members' summed ``scaling.*`` pieces (n, sum and sum of
    squares per feature on the log scale over their training splits; per shared regression endpoint over
    its labels), in the form of a member's ``scaling.json``; ``None`` when no member sent them. A feature
    fewer than 2 training samples measured is unmeasured here (0 after scaling)."""
    if "scaling.features.samples" not in sums:
        return None
    n = np.round(np.asarray(sums["scaling.features.samples"], dtype=np.float64))
    total = np.asarray(sums["scaling.features.sum"], dtype=np.float64)
    squares = np.asarray(sums["scaling.features.sumsq"], dtype=np.float64)
    measured = n >= 2
    mean = np.where(measured, total / np.maximum(n, 1), 0.0)
    variance = np.where(measured, (squares - n * mean**2) / np.maximum(n - 1, 1), 1.0)
    # level and indicator inputs stay 0/1 (the members sent only their n)
    fixed = len(config.panel_features()) + np.flatnonzero(np.array(input_kinds(config.panel.clinical)) != "numeric")
    measured[fixed], mean[fixed], variance[fixed] = True, 0.0, 1.0
    targets = {}
    for name in config.shared_endpoints():
        part = f"scaling.target_{name}"
        if f"{part}.samples" in sums and (m := float(np.round(sums[f"{part}.samples"]).item())) >= 2:
            target_mean = float(sums[f"{part}.sum"].item()) / m
            target_var = (float(sums[f"{part}.sumsq"].item()) - m * target_mean**2) / (m - 1)
            targets[name] = {"mean": target_mean, "scale": float(np.sqrt(max(target_var, 0.0))) or 1.0}
    return {
        "features": list(config.model_features()),
        "measured": measured.tolist(),
        "mean": mean.astype(np.float32).tolist(),
        # CKKS noise may leave a constant feature's variance a hair below 0
        "std": np.sqrt(np.maximum(variance, 0.0)).astype(np.float32).tolist(),
        "values": config.data.values,
        "target_sum": TARGET_SUM,
        "max_value": MAX_VALUE,
        "fitted_on": f"the members' training splits, pooled ({int(n.max())} samples)",
        "targets": targets,
    }


def panel_values(frame: pd.DataFrame, *, features: list[str], measured: np.ndarray, values: str) -> np.ndarray:
    """The panel's columns of ``frame`` as a float64 matrix in panel order, checked.

    Columns may carry Ensembl version suffixes (``ENSG00000104963.12``). A panel feature the member does
    not measure may be absent (it is 0 after scaling, as in training); a measured one may not.

    Raises
    ------
    ScoringInputError
        A measured panel feature is missing, a column is not numeric, a value is NaN or infinite, or a
        count is negative; the message names the column and the sample.
    """
    names, _ = strip_ensembl_versions(pd.Index(frame.columns.astype(str)))
    if names.duplicated().any():
        twice = sorted(set(names[names.duplicated()]))[:5]
        raise ScoringInputError(f"columns {twice} appear twice once Ensembl versions are stripped; keep one of each")
    frame = frame.set_axis(names, axis=1)
    wanted = [f for f, m in zip(features, measured, strict=True) if m]
    missing = [f for f in wanted if f not in frame.columns]
    if missing:
        raise ScoringInputError(
            f"the input lacks {len(missing)} of the {len(wanted)} panel features this member measures, e.g. "
            f"{missing[:5]}; give one column per panel feature, named by its identifier as the model signature "
            "lists them (MLflow drops the columns it does not name, such as ids with an Ensembl version suffix; "
            "`consortium score` reads the member's own layout)"
        )
    X = np.zeros((len(frame), len(features)), dtype=np.float64)
    for j, (feature, is_measured) in enumerate(zip(features, measured, strict=True)):
        if not is_measured:
            continue
        column = frame[feature]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise ScoringInputError(f"column '{feature}' holds {column.dtype} values; give numbers")
        X[:, j] = column.to_numpy(dtype=np.float64)
    refuse_bad_values(X, frame.index, features=features, values=values)
    return X


def refuse_bad_values(X: np.ndarray, index: pd.Index, *, features: list[str], values: str) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ScoringInputError(
            f"column '{features[j]}' is {X[i, j]} for sample '{index[i]}' ({int(bad.sum())} value(s) NaN or "
            "infinite in all); give a measured value for every panel feature the member measures"
        )
    if values == "counts" and (X < 0).any():
        i, j = np.argwhere(X < 0)[0]
        raise ScoringInputError(
            f"column '{features[j]}' is {X[i, j]:g} for sample '{index[i]}': the model takes counts, which are "
            "never negative; give the raw counts (a counts layer or .raw), not scaled or log values"
        )


def scaled_input(
    X: np.ndarray,
    *,
    scaling: Mapping[str, Any],
    library_size: np.ndarray | None = None,
) -> np.ndarray:
    """Raw panel values (samples x panel) as the network saw the member's samples in training: library
    size and ``log1p`` per sample, then the member's fixed per-feature statistics; unmeasured features 0."""
    measured = np.asarray(scaling["measured"], dtype=bool)
    if library_size is None and scaling["values"] == "counts":
        library_size = X[:, measured].sum(axis=1)
    logged = log_values(X, values=scaling["values"], target_sum=float(scaling["target_sum"]), library_size=library_size)
    out = scale_features(
        logged, mean=np.asarray(scaling["mean"]), std=np.asarray(scaling["std"]), max_value=float(scaling["max_value"])
    )
    out[:, ~measured] = 0.0
    return out


class ConsortiumModel(PythonModel):
    """Raw panel features in, one column per shared endpoint out (binary: probability; regression: the
    target's units; survival: risk score), with the scoring member's ``scaling`` file as a parameter."""

    def load_context(self, context) -> None:
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        net = self.spec["network"]
        self.model = SharedModel(
            len(self.spec.get("inputs", self.spec["features"])),
            shared_tasks=self.spec["endpoints"],
            trunk_widths=net["trunk_widths"],
            head_width=net["head_width"],
            dropout=net["dropout"],
        )
        with np.load(context.artifacts["state"]) as state:
            self.model.load_state_dict({k: torch.as_tensor(state[k]) for k in state.files})
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        scaling = self.scaling(params)
        features = self.spec["features"]
        omics = _first_columns(scaling, len(features))
        X = panel_values(model_input, features=features, measured=np.asarray(omics["measured"]), values=omics["values"])
        library = None
        if LIBRARY_SIZE in model_input.columns:
            library = model_input[LIBRARY_SIZE].to_numpy(dtype=np.float64)
            if not (np.isfinite(library) & (library > 0)).all():
                raise ScoringInputError(f"column '{LIBRARY_SIZE}' must be positive total counts per sample")
        scaled = scaled_input(X, scaling=omics, library_size=library)
        if self.spec.get("clinical"):
            scaled = np.hstack([scaled, clinical_input(model_input, spec=self.spec, scaling=scaling)])
        return predict_endpoints(self.model, scaled, spec=self.spec, scaling=scaling).set_axis(model_input.index)

    def scaling(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        path = str((params or {}).get(SCALING_PARAM) or "")
        if not path and self.spec.get("pooled_scaling"):
            return self.spec["pooled_scaling"]
        if not path:
            raise ScoringInputError(
                "no scaling statistics: this model scores a member's samples with the member's own training "
                f"statistics, kept in its site folder (sites/<member>/{SCALING_FILE}); pass "
                f'params={{\'{SCALING_PARAM}\': path}} (over REST: "params": {{"{SCALING_PARAM}": path}}) or use '
                "`consortium score`"
            )
        scaling = read_scaling(path)
        inputs = self.spec.get("inputs", self.spec["features"])
        if list(scaling["features"]) != list(inputs):
            raise ScoringInputError(
                f"{path}: its features are not this model's inputs ({len(scaling['features'])} vs "
                f"{len(inputs)}); use the scaling file of a run of '{self.spec['consortium']}'"
            )
        return scaling


def _first_columns(scaling: Mapping[str, Any], count: int) -> dict[str, Any]:
    """``scaling`` restricted to its first ``count`` features (the omics panel's)."""
    return {**scaling, **{key: list(scaling[key])[:count] for key in ("features", "measured", "mean", "std")}}


def clinical_input(frame: pd.DataFrame, *, spec: Mapping[str, Any], scaling: Mapping[str, Any]) -> np.ndarray:
    """The clinical inputs of ``frame`` (raw obs columns: ``age``, ``sex``) as the network saw them in
    training: encoded as declared (:func:`omics.clinical.encode_clinical`), a missing numeric value filled
    with the scaling's mean, then scaled with it (level and indicator columns stay 0/1).

    Raises
    ------
    ScoringInputError
        A column is absent, or a value breaks its declaration (the message names the column and the fix).
    """
    clinical = [ClinicalFeature.model_validate(c) for c in spec["clinical"]]
    try:
        block = encode_clinical(frame, clinical, path="model input")
    except ContractError as exc:
        raise ScoringInputError(str(exc)) from None
    start = len(spec["features"])
    mean = np.asarray(scaling["mean"], dtype=np.float64)[start:]
    std = np.asarray(scaling["std"], dtype=np.float64)[start:]
    return scale_features(filled(block, mean=mean), mean=mean, std=std, max_value=float(scaling["max_value"]))


def predict_endpoints(
    model: SharedModel, X: np.ndarray, *, spec: Mapping[str, Any], scaling: Mapping[str, Any]
) -> pd.DataFrame:
    """Per shared endpoint, the prediction for scaled inputs ``X`` in its real units (module doc)."""
    out = {}
    targets = scaling.get("targets") or {}
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        for name in spec["endpoints"]:
            value = model.forward_task(x, name).double()
            kind = spec["kinds"][name]
            if kind == "binary":
                value = torch.sigmoid(value)
            elif kind == "regression":
                if name not in targets:
                    log.warning("endpoint %s: this member holds no labels for it, so no units; left out", name)
                    continue
                value = value * float(targets[name]["scale"]) + float(targets[name]["mean"])
            out[name] = value.numpy()
    return pd.DataFrame(out, index=pd.RangeIndex(len(X))).astype(np.float64)


def signature(config: ConsortiumConfig) -> ModelSignature:
    """Inputs: one number per panel feature, by name (optional each, so that the model, not MLflow, names
    what is missing; a member's unmeasured features may be absent), and the optional library size;
    outputs: one column per shared endpoint; parameter: the member's scaling file."""
    features = [ColSpec("double", name, required=False) for name in config.panel_features()]
    clinical = [  # raw obs columns, encoded by the model as declared (panel.clinical)
        ColSpec("double" if c.type == "numeric" else "string", c.column, required=False) for c in config.panel.clinical
    ]
    return ModelSignature(
        inputs=Schema([*features, *clinical, *[ColSpec("double", LIBRARY_SIZE, required=False)] * bool(features)]),
        outputs=Schema([ColSpec("double", name) for name in config.shared_endpoints()]),
        params=ParamSchema([ParamSpec(SCALING_PARAM, "string", "")]),
    )


def log_registered_model(
    config: ConsortiumConfig,
    state: dict[str, np.ndarray],
    *,
    folder: Path,
    pooled: Mapping[str, np.ndarray] | None = None,
) -> str | None:
    """Log the pyfunc model in the active run and register it under the consortium's name; returns its
    ``models:/<name>/<version>`` URI, or None for a consortium without shared endpoints (nothing for
    the model to predict). ``folder`` holds the artifact files while they are logged. ``pooled``: the
    summed ``scaling.*`` pieces of the release, the scaling used when a scorer gives none of its own."""
    if not config.shared_endpoints():
        log.warning("consortium %s has no shared endpoint: no model to register (the trunk is logged)", config.name)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / STATE_FILE, **{k: np.asarray(v, dtype=np.float32) for k, v in state.items()})
    spec = model_spec(config)
    if (scaling := pooled_scaling(pooled or {}, config=config)) is not None:
        spec["pooled_scaling"] = scaling
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    info = mlflow.pyfunc.log_model(
        name=REGISTERED_ARTIFACT,
        python_model=ConsortiumModel(),
        artifacts={"state": str(folder / STATE_FILE), "spec": str(folder / SPEC_FILE)},
        signature=signature(config),
        registered_model_name=config.name,
        # explicit: inferring requirements scans the environment for many seconds
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    version = info.registered_model_version
    log.info("registered the shared model as models:/%s/%s", config.name, version)
    return f"models:/{config.name}/{version}"
