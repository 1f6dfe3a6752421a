"""Local-only vs pooled training on a synthetic consortium: test metrics and biomarker recovery.

Usage: python benchmarks/model_baselines.py [--out DIR] [--seed S]

Synthesizes the default consortium (300, 800, 2000 samples x 2000 features) unless DIR already holds
one, trains each member alone and all members pooled with the settings in consortium.yaml, and prints
per member and task the primary test metric and the precision at k of the planted biomarkers
(k = number of planted features of the task).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from consortium.commands.synth import synthesize
from jobs.member_data import load_member_data, network_kwargs, task_specs, train_settings
from models.attribution import precision_at_k, rank_features
from models.baselines import train_local, train_pooled
from models.metrics import primary_metric
from schema.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="consortium folder (made if absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60, help="max epochs (early stopping on val)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="baselines-"))
    config_path = out / "consortium.yaml"
    if not config_path.exists():
        synthesize(out, sizes=[300, 800, 2000], n_features=2000, seed=args.seed)
    config = load_config(config_path)
    truth = json.loads((out / "ground_truth.json").read_text())["tasks"]
    settings = train_settings(config)
    settings = type(settings)(**{**settings.__dict__, "epochs": args.epochs})
    network = network_kwargs(config)
    data = {m.name: load_member_data(config, m.name) for m in config.members}
    tasks = {m.name: task_specs(config, m.name) for m in config.members}

    started = time.perf_counter()
    local = {name: train_local(data[name], tasks[name], settings=settings, network=network) for name in data}
    local_s = time.perf_counter() - started
    started = time.perf_counter()
    pooled = train_pooled(data, tasks, settings=settings, network=network)
    pooled_s = time.perf_counter() - started

    print(f"{'member':10} {'task':12} {'metric':8} {'local':>7} {'pooled':>7}  {'P@k local':>9} {'P@k pooled':>10}")
    gains = {}
    for name in data:
        train_x = data[name].subset("train").X
        for task in tasks[name]:
            metric = primary_metric(task.kind)
            lv = local[name].metrics[task.name][metric]
            pv = pooled.metrics[name][task.name][metric]
            features = data[name].feature_names
            pk_local = precision_at_k(
                rank_features(local[name].model, train_x, task.name, feature_names=features), truth[task.name]
            )
            pk_pooled = precision_at_k(
                rank_features(pooled.model, train_x, task.name, feature_names=features), truth[task.name]
            )
            gains.setdefault(name, []).append(pv - lv)
            print(f"{name:10} {task.name:12} {metric:8} {lv:7.3f} {pv:7.3f}  {pk_local:9.2f} {pk_pooled:10.2f}")
    for name, values in gains.items():
        print(f"{name}: mean gain of pooled over local = {np.mean(values):+.3f}")
    print(f"seconds: local (all members) {local_s:.1f}, pooled {pooled_s:.1f}")


if __name__ == "__main__":
    main()
