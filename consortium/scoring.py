"""A member scores new samples at its own site with the released model (``consortium score``).

The member's ``.h5ad`` is read in its own layout (``members[].layer``, ``var_id_column``, versioned
Ensembl ids) as the data check and training read it (:func:`omics.layout.apply_layout`); the registered
pyfunc model (:mod:`consortium.registry`) scores it with the member's own fixed scaling
(``sites/<member>/scaling.json``), one sample or many, each sample's answer its own. Per shared endpoint:
the prediction in real units, a split-conformal interval (regression) or set (binary) calibrated on the
member's own validation split (:mod:`models.conformal`; the split never leaves the member), and an
alert where the prediction is beyond a threshold the member sets.
"""

from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import mlflow
import numpy as np
import pandas as pd

from consortium.registry import LIBRARY_SIZE, SCALING_PARAM, ScoringInputError, predict_endpoints, refuse_bad_values
from jobs.member_data import load_member
from jobs.site_outputs import SCALING_FILE, read_scaling, site_folder
from models.conformal import DEFAULT_LEVEL, Conformal, calibrate
from models.data import MemberData
from omics.io import read_member, write_member
from omics.layout import MemberLayout, apply_layout
from schema import settings
from schema.config import ConsortiumConfig

log = logging.getLogger(__name__)

_ALERT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
_OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Alert:
    """``ENDPOINT>VALUE`` (or ``>=``, ``<``, ``<=``): flag the samples whose prediction is beyond it."""

    endpoint: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.endpoint}{self.op}{self.value:g}"

    def flags(self, predictions: np.ndarray) -> np.ndarray:
        return _OPERATORS[self.op](np.asarray(predictions, dtype=np.float64), self.value)


def parse_alert(text: str, *, endpoints: Sequence[str]) -> Alert:
    """``"marker>1.5"`` -> :class:`Alert`; ``ValueError`` naming the text, the form and the endpoints."""
    match = _ALERT.match(text)
    if not match:
        raise ValueError(f"--alert '{text}': write ENDPOINT>VALUE (or >=, <, <=), e.g. {endpoints[0]}>0.5")
    name, op, value = match.groups()
    if name not in endpoints:
        raise ValueError(f"--alert '{text}': no shared endpoint '{name}'; the model predicts {list(endpoints)}")
    return Alert(name, op, float(value))


@dataclass
class Scores:
    """What ``consortium score`` shows: one row per sample, and where it came from."""

    table: pd.DataFrame
    model_uri: str
    scaling: Path
    level: float
    endpoints: dict[str, str]
    alerts: list[Alert] = field(default_factory=list)
    calibration: dict[str, int] = field(default_factory=dict)
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)


def member_input(
    adata: ad.AnnData,
    *,
    layout: MemberLayout,
    features: Sequence[str],
    values: str = "counts",
    path: str = "",
    clinical: Sequence[str] = (),
) -> pd.DataFrame:
    """A member's file, read in its layout, as the pyfunc model's input: the panel features it holds
    (by identifier, versions stripped), each sample's library size over every feature of the file, and
    the ``clinical`` obs columns as they are (the model encodes them as ``panel.clinical`` declares).

    Raises
    ------
    ScoringInputError
        A value is NaN, infinite or, for counts, negative (the message names the feature and sample), or a
        clinical column is absent from obs.
    """
    absent = [c for c in clinical if c not in adata.obs.columns]
    if absent:
        raise ScoringInputError(
            f"{path or 'member data'}: the model takes the clinical obs column(s) {absent} (panel.clinical), "
            "which obs lacks; add them to the file's obs"
        )
    view = apply_layout(adata, layout=layout, path=path)
    X = view.X.toarray() if hasattr(view.X, "toarray") else np.asarray(view.X)
    X = np.asarray(X, dtype=np.float64)
    if len(features):  # a clinical-only model reads no feature of X
        refuse_bad_values(X, view.obs_names, features=[str(v) for v in view.var_names], values=values)
    present = [f for f in features if f in view.var_names]
    frame = pd.DataFrame(X[:, view.var_names.get_indexer(present)], index=view.obs_names, columns=present)
    if values == "counts" and len(features):
        frame[LIBRARY_SIZE] = X.sum(axis=1)
    for column in clinical:
        frame[column] = view.obs[column].to_numpy()
    return frame


def latest_model(config: ConsortiumConfig, *, tracking_uri: str) -> str:
    """``models:/<consortium>/<latest version>`` in the tracking store; ``ValueError`` when none is."""
    mlflow.set_tracking_uri(tracking_uri)
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{config.name}'")
    if not versions:
        raise ValueError(
            f"no registered model '{config.name}' in {tracking_uri}; a run registers one when the consortium has "
            "a shared endpoint (give --model models:/<name>/<version> or the run's folder with --run)"
        )
    return f"models:/{config.name}/{max(int(v.version) for v in versions)}"


def score_file(
    config: ConsortiumConfig,
    member: str,
    *,
    data: Path,
    scaling: Path,
    model_uri: str,
    level: float = DEFAULT_LEVEL,
    alerts: Sequence[str] = (),
    fold: int | None = None,
) -> Scores:
    """Score the samples in ``data`` (an ``.h5ad`` in ``member``'s layout) with the model at ``model_uri``
    and the member's ``scaling`` file; conformal intervals calibrated on the member's validation split, and
    their coverage on its test split (``fold``: the cross-validation fold the run's site folder is for)."""
    member = config.member(member).name
    scaling = scaling / SCALING_FILE if scaling.is_dir() else scaling
    read_scaling(scaling)  # a clear error before the model loads
    model = mlflow.pyfunc.load_model(model_uri)
    spec = model.unwrap_python_model().spec
    checked = [parse_alert(a, endpoints=spec["endpoints"]) for a in alerts]
    frame = member_input(
        read_member(data),  # a DataFileError naming the file when it is not an .h5ad
        layout=MemberLayout(**settings.member_layout(config, member)),
        features=spec["features"],
        path=str(data),
        values=config.data.values,
        clinical=[c["column"] for c in spec.get("clinical", [])],
    )
    predicted = model.predict(frame, params={SCALING_PARAM: str(scaling)})
    data = load_member(config, member, fold=fold).data
    held = [task.name for task in config.member(member).tasks]
    calibrators = member_calibration(model, data, held=held, scaling=scaling, level=level)
    table = scores_table(predicted, kinds=spec["kinds"], calibrators=calibrators, alerts=checked)
    return Scores(
        table=table,
        model_uri=model_uri,
        scaling=scaling,
        level=level,
        endpoints={name: spec["kinds"][name] for name in predicted.columns},
        alerts=checked,
        calibration={name: c.n_calibration for name, c in calibrators.items()},
        coverage=split_coverage(model, data, scaling=scaling, calibrators=calibrators),
    )


def member_calibration(
    model: Any, data: MemberData, *, held: Sequence[str], scaling: Path, level: float
) -> dict[str, Conformal]:
    """Per shared endpoint in ``held`` with enough validation labels, its conformal calibration on the
    member's validation split (``data``: read, split and scaled as in training; it never leaves the member)."""
    val = data.subset("val")
    predicted = _predict_prepared(model, val.X, scaling=scaling)
    kinds = model.unwrap_python_model().spec["kinds"]
    out = {}
    for name in predicted.columns:
        if name in held and (calibrator := calibrate(kinds[name], predicted[name], val.targets[name], level=level)):
            out[name] = calibrator
    return out


def split_coverage(
    model: Any, data: MemberData, *, scaling: Path, calibrators: dict[str, Conformal], split: str = "test"
) -> dict[str, dict[str, float]]:
    """Per calibrated endpoint, the share of the member's labelled ``split`` samples whose interval or set
    holds the true value, and how many there were."""
    part = data.subset(split)
    predicted = _predict_prepared(model, part.X, scaling=scaling)
    out = {}
    for name, calibrator in calibrators.items():
        covered = calibrator.covers(predicted[name].to_numpy(), part.targets[name])
        out[name] = {"coverage": float(covered.mean()) if covered.size else float("nan"), "n": int(covered.size)}
    return out


def conformal_coverage(
    config: ConsortiumConfig,
    member: str,
    *,
    model_uri: str,
    scaling: Path,
    level: float = DEFAULT_LEVEL,
    fold: int | None = None,
) -> dict[str, dict[str, float]]:
    """A member's conformal coverage on its test split (calibrated on its validation split), per endpoint;
    ``fold``: the cross-validation fold of a run with ``--folds`` (its test split)."""
    model = mlflow.pyfunc.load_model(model_uri)
    data = load_member(config, member, fold=fold).data
    held = [task.name for task in config.member(member).tasks]
    calibrators = member_calibration(model, data, held=held, scaling=scaling, level=level)
    return split_coverage(model, data, scaling=scaling, calibrators=calibrators)


def held_out_samples(config: ConsortiumConfig, member: str, *, out: Path) -> Path:
    """The member's test-split samples, as its file holds them (its layout), written to ``out``: new
    samples to score in a demo (the model never trained on them)."""
    adata = read_member(config.member(member).data)
    if "split" not in adata.obs.columns:
        raise ValueError(f"{config.member(member).data}: no split in obs; write one with `consortium data split`")
    held = adata[adata.obs["split"].astype(str) == "test"].copy()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_member(held, out)
    return out


def _predict_prepared(model: Any, X: np.ndarray, *, scaling: Path) -> pd.DataFrame:
    """The model's predictions for samples already scaled as in training (:func:`jobs.member_data.load_member`)."""
    python_model = model.unwrap_python_model()
    return predict_endpoints(python_model.model, X, spec=python_model.spec, scaling=read_scaling(scaling))


def scores_table(
    predicted: pd.DataFrame,
    *,
    kinds: dict[str, str],
    calibrators: dict[str, Conformal],
    alerts: Sequence[Alert],
) -> pd.DataFrame:
    """One row per sample: each endpoint's prediction, its interval (``_low``, ``_high``) or set
    (``_set``: the labels in it, ``"0"``, ``"1"``, ``"0,1"`` or ``"none"``), and ``alert <rule>`` flags."""
    table = pd.DataFrame(index=predicted.index)
    for name in predicted.columns:
        values = predicted[name].to_numpy()
        table[name] = values
        calibrator = calibrators.get(name)
        if calibrator is None:
            continue
        if kinds[name] == "regression":
            table[f"{name}_low"], table[f"{name}_high"] = calibrator.interval(values)
        elif kinds[name] == "binary":
            sets = calibrator.prediction_set(values)
            table[f"{name}_set"] = [",".join(str(k) for k in (0, 1) if row[k]) or "none" for row in sets]
    for alert in alerts:
        if alert.endpoint not in predicted.columns:
            raise ValueError(f"--alert '{alert}': the model gave no prediction for '{alert.endpoint}' here")
        table[f"alert {alert}"] = alert.flags(predicted[alert.endpoint])
    return table


def released_fold(run: Path) -> int | None:
    """The cross-validation fold whose model a run released (``report.json``'s ``release.fold``; ``None``
    without folds): the fold whose site folders hold the scaling that model was trained with."""
    fold = (_run_report(run).get("release") or {}).get("fold")
    return None if fold is None else int(fold)


def run_model(run: Path) -> str | None:
    """The model a run registered (``report.json``'s ``tracking.registered_model``), if it did."""
    return (_run_report(run).get("tracking") or {}).get("registered_model")


def _run_report(run: Path) -> dict[str, Any]:
    report = Path(run) / "report.json"
    return json.loads(report.read_text()) if report.is_file() else {}


def default_scaling(run: Path, member: str, *, fold: int | None = None) -> Path:
    """A member's scaling file in a run folder (``sites/<member>/`` or ``sites/fold<k>/<member>/``)."""
    root = run / "sites" if fold is None else run / "sites" / f"fold{fold}"
    return site_folder(root, member) / SCALING_FILE


__all__ = ["Alert", "Scores", "ScoringInputError", "latest_model", "member_input", "parse_alert", "score_file"]
