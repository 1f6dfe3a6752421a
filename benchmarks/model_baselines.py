"""Local-only vs pooled training on a synthetic consortium: test metrics and biomarker recovery.

Usage: python benchmarks/model_baselines.py [--out DIR] [--seed S] [--rounds R] [--select both|fixed|selected]

Synthesizes the default consortium (300, 800, 2000 samples x 2000 features, the demo's 10 rounds) unless
DIR already holds one, then trains each member alone (``local``) and all members pooled (``pooled``) with
the settings in its consortium.yaml. No FLARE. Two training rules:

- ``fixed`` (the platform's rule, ``consortium.comparison``): exactly the passes over the training data a
  federated run gives a member (rounds x local epochs), last weights kept (``select=False``);
- ``selected``: at most as many passes, the epoch chosen on the validation split (``select=True``).

Printed per member and task: the primary test metric (AUROC, R2 or C-index) and the precision at k of
the planted biomarkers (k = number of planted features of the task); then each member's means.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from consortium.commands.synth import synthesize
from jobs.member_data import load_member_data, task_specs
from models.attribution import precision_at_k, rank_features
from models.baselines import train_local, train_pooled
from models.metrics import primary_metric
from models.training import TrainSettings
from schema.config import load_config
from schema.settings import network, train_settings

DEMO_ROUNDS = 10  # what `consortium demo` writes into a fresh synthetic consortium
RULES = {"fixed": False, "selected": True}  # rule name -> select


def train_arms(config, data, tasks, *, passes: int, select: bool) -> tuple[dict, object, float]:
    """Each member's local model and the pooled model under one rule; seconds taken."""
    settings = TrainSettings(**train_settings(config, epochs=passes))
    net = network(config)
    started = time.perf_counter()
    local = {
        name: train_local(data[name], tasks[name], settings=settings, network=net, select=select, max_epochs=passes)
        for name in data
    }
    pooled = train_pooled(data, tasks, settings=settings, network=net, select=select, max_epochs=passes)
    return local, pooled, time.perf_counter() - started


def score_arms(data, tasks, truth, local, pooled) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """``{member: {task: {arm: (metric, precision at k)}}}`` for the local and pooled arms."""
    out: dict = {}
    for name in data:
        train_x, features = data[name].subset("train").X, data[name].feature_names
        for task in tasks[name]:
            metric = primary_metric(task.kind)
            row = out.setdefault(name, {}).setdefault(task.name, {})
            for arm, model, metrics in (
                ("local", local[name].model, local[name].metrics),
                ("pooled", pooled.model, pooled.metrics[name]),
            ):
                ranking = rank_features(model, train_x, task.name, feature_names=features)
                row[arm] = (metrics[task.name][metric], precision_at_k(ranking, truth[task.name]))
    return out


def print_tables(scores: dict[str, dict], tasks: dict, *, rules: list[str]) -> None:
    columns = [f"{arm}/{rule}" for rule in rules for arm in ("local", "pooled")]
    head = f"{'member':10} {'task':12} {'metric':8} " + " ".join(f"{c:>15}" for c in columns)
    print(head + "\n" + " " * 32 + " ".join(f"{'metric   P@k':>15}" for _ in columns))
    for name, by_task in tasks.items():
        for task in by_task:
            cells = [scores[rule][name][task.name][arm] for rule in rules for arm in ("local", "pooled")]
            print(
                f"{name:10} {task.name:12} {primary_metric(task.kind):8} "
                + " ".join(f"{m:8.3f} {p:6.2f}" for m, p in cells)
            )
    print(f"\nmean over each member's tasks\n{'member':10} {'':21} " + " ".join(f"{c:>15}" for c in columns))
    for name, by_task in tasks.items():
        cells = []
        for rule in rules:
            for arm in ("local", "pooled"):
                values = np.array([scores[rule][name][t.name][arm] for t in by_task])
                cells.append(values.mean(axis=0))
        print(f"{name:10} {'':21} " + " ".join(f"{m:8.3f} {p:6.2f}" for m, p in cells))
    for rule in rules:
        gains = [
            np.mean([scores[rule][n][t.name]["pooled"][0] - scores[rule][n][t.name]["local"][0] for t in ts])
            for n, ts in tasks.items()
        ]
        print(f"{rule}: mean metric gain of pooled over local per member: " + ", ".join(f"{g:+.3f}" for g in gains))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="consortium folder (made if absent; default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a newly synthesized consortium")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds to match (default: the config's)")
    parser.add_argument("--select", choices=["both", *RULES], default="both", help="training rule(s) to report")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="baselines-"))
    config_path = out / "consortium.yaml"
    if not config_path.exists():
        synthesize(out, sizes=[300, 800, 2000], n_features=2000, seed=args.seed, rounds=DEMO_ROUNDS)
    config = load_config(config_path)
    truth = json.loads((out / "ground_truth.json").read_text())["tasks"]
    rounds = args.rounds or config.training.rounds
    passes = rounds * config.training.local_epochs
    data = {m.name: load_member_data(config, m.name) for m in config.members}
    tasks = {m.name: task_specs(config, m.name) for m in config.members}
    rules = list(RULES) if args.select == "both" else [args.select]
    print(
        f"consortium {config_path}: {', '.join(f'{n} ({d.X.shape[0]})' for n, d in data.items())}; "
        f"{rounds} rounds x {config.training.local_epochs} local epochs = {passes} passes"
    )
    scores = {}
    for rule in rules:
        local, pooled, seconds = train_arms(config, data, tasks, passes=passes, select=RULES[rule])
        scores[rule] = score_arms(data, tasks, truth, local, pooled)
        print(f"{rule}: trained local (all members) and pooled in {seconds:.1f} s")
    print()
    print_tables(scores, tasks, rules=rules)


if __name__ == "__main__":
    main()
