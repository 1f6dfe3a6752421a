"""Real-data benchmark: canonical-marker recovery and prediction, through the real CLI.

Usage: python benchmarks/science.py --out DIR [--datasets pbmc,gse7390] [--splits random,skewed]
       [--folds 5] [--seed S] [--resume] [--stats-only]

Uses only data bundled in installed packages (no network):

* ``pbmc``: scanpy's ``pbmc68k_reduced`` (700 cells x 765 log-normalized genes), split over three
  members (``random``, or ``skewed``: one member mostly B cells, one mostly T cells, one the rest).
  Shared binary endpoints ``b_cell``, ``nk_cell``, ``monocyte``; we count the canonical markers in
  the top 10 of the federated association statistics and of the federated model ranking.
* ``gse7390``: scikit-survival's GSE7390 breast cancer set (198 patients x 76 probes), split at random
  over three members; shared survival endpoint ``distant_metastasis`` (C-index).

Each consortium runs as ``consortium run --env sim --no-he --folds K --baselines``; the figures are
read back from ``report.json``. With ``--stats-only`` it runs ``consortium stats --env sim --no-he``
instead (the association statistics alone, every sample, no training): marker recovery of the
statistics in a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from schema.config import load_config

MEMBERS = ("site-a", "site-b", "site-c")
PBMC_ENDPOINTS = {"b_cell": ["CD19+ B"], "nk_cell": ["CD56+ NK"], "monocyte": ["CD14+ Monocyte"]}
CANONICAL = {
    "b_cell": ["CD79A", "CD79B", "MS4A1", "CD74", "HLA-DRA", "CD19", "TCL1A", "BANK1", "CD22", "TNFRSF13B"],
    "nk_cell": ["NKG7", "GNLY", "GZMB", "GZMA", "PRF1", "CST7", "CTSW", "KLRD1", "FGFBP2", "GZMH"],
    "monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1", "VCAN", "CST3", "TYROBP", "FCER1G", "LST1"],
}
# acceptance targets (hits in the top 10) where the brief sets them: statistics, model
TARGETS = {"b_cell": (4, 3), "nk_cell": (4, 3)}
TOP = 10
# member shares per cell group; the skewed split puts B cells at site-a, T cells at site-b
SKEWED = {"b": [0.8, 0.1, 0.1], "t": [0.1, 0.8, 0.1], "other": [0.1, 0.1, 0.8]}
TRAINING = {
    "pbmc": {
        "rounds": 5,
        "local_epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.003,
        "trunk_widths": [64, 32],
        "head_width": 16,
        "dropout": 0.1,
        "patience": 5,
    },
    # 198 patients x 76 probes: a small, near-linear network (one hidden layer, linear head) and more,
    # shorter rounds; every network arm trains the same 20 passes, none selects an epoch
    "gse7390": {
        "rounds": 20,
        "local_epochs": 1,
        "batch_size": 16,
        "learning_rate": 0.003,
        "weight_decay": 0.001,
        "trunk_widths": [32],
        "head_width": 0,
        "dropout": 0.3,
        "patience": 5,
    },
}


def cell_group(label: str) -> str:
    if label == "CD19+ B":
        return "b"
    return "t" if label.startswith(("CD4+", "CD8+")) else "other"


def assign_members(labels: pd.Series, *, split: str, floor: int, seed: int) -> np.ndarray:
    """A member index per cell: ``floor`` cells of each endpoint's cell type to every member first
    (quorum and folds), the rest at random with the split's shares."""
    rng = np.random.default_rng(seed)
    member = np.full(labels.size, -1)
    for types in PBMC_ENDPOINTS.values():
        rows = rng.permutation(np.flatnonzero(labels.isin(types).to_numpy()))
        for i in range(len(MEMBERS)):
            member[rows[i * floor : (i + 1) * floor]] = i
    for row in np.flatnonzero(member < 0):
        shares = SKEWED[cell_group(labels.iloc[row])] if split == "skewed" else [1 / 3] * 3
        member[row] = rng.choice(len(MEMBERS), p=shares)
    return member


def pbmc_members(*, split: str, floor: int, seed: int) -> tuple[dict[str, ad.AnnData], dict]:
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    full = reduced.raw.to_adata()
    full.var_names_make_unique()
    labels = reduced.obs["bulk_labels"].astype(str)
    obs = pd.DataFrame(
        {name: labels.isin(types).astype(float).to_numpy() for name, types in PBMC_ENDPOINTS.items()},
        index=full.obs_names,
    )
    full = ad.AnnData(X=np.asarray(full.X.toarray(), dtype=np.float32), obs=obs, var=pd.DataFrame(index=full.var_names))
    member = assign_members(labels, split=split, floor=floor, seed=seed)
    data = {name: full[member == i].copy() for i, name in enumerate(MEMBERS)}
    tasks = [{"name": name, "type": "binary", "column": name} for name in PBMC_ENDPOINTS]
    composition = {name: labels[member == i].map(cell_group).value_counts().to_dict() for i, name in enumerate(MEMBERS)}
    print(f"pbmc {split}: cells per member by group (b/t/other): {composition}")
    return data, {"tasks": tasks, "values": "normalized"}


def gse7390_members(*, seed: int) -> tuple[dict[str, ad.AnnData], dict]:
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    probes = [c for c in X.columns if c.endswith("_at")]  # the rest are clinical (age, er, grade, size...)
    obs = pd.DataFrame(
        {"dm_time": y["t.tdm"].astype(float), "dm_event": y["e.tdm"].astype(float)},
        index=[f"patient{i}" for i in range(len(X))],
    )
    var = pd.DataFrame(index=[p.removeprefix("X") for p in probes])  # R's make.names added the 'X'
    full = ad.AnnData(X=X[probes].to_numpy(dtype=np.float32), obs=obs, var=var)
    member = np.random.default_rng(seed).permutation(np.arange(full.n_obs) % len(MEMBERS))
    data = {name: full[member == i].copy() for i, name in enumerate(MEMBERS)}
    print(
        f"gse7390: patients (events) per member: "
        f"{ {n: (a.n_obs, int(a.obs['dm_event'].sum())) for n, a in data.items()} }"
    )
    tasks = [
        {"name": "distant_metastasis", "type": "survival", "time": "dm_time", "event": "dm_event", "time_unit": "days"}
    ]
    return data, {"tasks": tasks, "values": "normalized"}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def write_consortium(folder: Path, data: dict[str, ad.AnnData], spec: dict, *, dataset: str, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, adata in data.items():
        adata.write_h5ad(folder / f"{name}.h5ad")
    panel = next(iter(data.values())).var_names
    (folder / "panel.txt").write_text("\n".join(panel) + "\n")
    fl_port, admin_port = free_ports(2)
    config = {
        "name": f"science-{dataset}",
        "operator": {"org": "Neutral_Operator", "host": "localhost", "fl_port": fl_port, "admin_port": admin_port},
        "panel": {"file": "panel.txt", "id_kind": "symbol", "min_coverage": 0.8},
        "data": {
            "values": spec["values"],
            "min_class_count": 3,
            "min_events": 5,
            "min_labeled": 10,
            "min_cell_count": 3,
            "split_seed": seed,
        },
        "members": [
            {
                "name": name,
                "org": name.replace("-", "_").title(),
                "data": f"{name}.h5ad",
                "tasks": [dict(t) for t in spec["tasks"]],
            }
            for name in data
        ],
        "training": {**TRAINING[dataset], "seed": seed},
        "privacy": {"he": {"enabled": False}},
    }
    path = folder / "consortium.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(path)  # fail here, with the field named, rather than inside the run
    return path


def run_cli(config: Path, out: Path, *, folds: int) -> dict:
    command = [
        str(Path(sys.executable).with_name("consortium")),
        "run",
        "--config",
        str(config),
        "--env",
        "sim",
        "--no-he",
        "--folds",
        str(folds),
        "--baselines",
        "--out",
        str(out),
    ]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    print(f"exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
    if code != 0 or not (out / "report.json").exists():
        raise RuntimeError(f"consortium run failed (exit {code}); see {out / 'console.log'} and {out / 'flare'}")
    return json.loads((out / "report.json").read_text())


def run_stats(config: Path, out: Path) -> dict:
    """``consortium stats`` on the consortium; its statistics.json read as the parts of a report the
    recovery reads (no model ranking, no metrics)."""
    command = [str(Path(sys.executable).with_name("consortium")), "stats", "--config", str(config)]
    command += ["--env", "sim", "--no-he", "--out", str(out)]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    print(f"exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
    if code != 0 or not (out / "statistics.json").exists():
        raise RuntimeError(f"consortium stats failed (exit {code}); see {out / 'console.log'}")
    endpoints = json.loads((out / "statistics.json").read_text())["endpoints"]
    return {
        "endpoints": {name: {"metric": "n/a"} for name in endpoints},
        "biomarkers": {
            "statistics": {name: e["statistics"] for name, e in endpoints.items()},
            "markers": {name: e["markers"] for name, e in endpoints.items()},
            "model": {},
        },
    }


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else f"{value:.3f}"


def print_metrics(report: dict) -> None:
    arms = ("federated", "local", "pooled", "linear_pooled")
    print(f"{'endpoint':20} {'metric':8} {'n':>4} " + " ".join(f"{a:>22}" for a in arms) + f" {'fed-pooled':>24} gain")
    for name, e in report["endpoints"].items():
        diff = e.get("difference", {}).get("federated-pooled", {})
        print(
            f"{name:20} {e['metric']:8} {e.get('n', ''):>4} "
            + " ".join(f"{_ci(e.get(a), e.get('ci', {}).get(a)):>22}" for a in arms)
            + f" {_ci(diff.get('estimate'), diff.get('ci')):>24} {diff.get('gain')}"
        )


def pooled_reference(data: dict[str, ad.AnnData]) -> dict[str, dict[str, list[str]]]:
    """What the same rankings give on the pooled cells, with scipy and scikit-learn (a yardstick only:
    the consortium never pools). ``welch p``: Welch t-test by two-sided p-value; ``welch t``: by the
    t statistic, higher in the cell type (scanpy's rank_genes_groups order); ``logistic``: the
    standardized coefficients of an L2-penalized logistic regression, largest first (a linear model's
    ranking, the yardstick for the network's)."""
    from scipy import stats
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    full = ad.concat(list(data.values()))
    X, genes = np.asarray(full.X, dtype=np.float64), np.asarray(full.var_names)
    scaled = StandardScaler().fit_transform(X)
    reference = {}
    for name in PBMC_ENDPOINTS:
        y = full.obs[name].to_numpy() > 0.5
        t, p = stats.ttest_ind(X[y], X[~y], equal_var=False)
        t, p = np.nan_to_num(t), np.nan_to_num(p, nan=1.0)
        coef = LogisticRegression(C=0.05, max_iter=5000).fit(scaled, y).coef_[0]
        reference[name] = {
            "pooled welch p": list(genes[np.lexsort((-np.abs(t), p))[:TOP]]),
            "pooled welch t": list(genes[np.argsort(-t, kind="stable")[:TOP]]),
            "pooled logistic": list(genes[np.argsort(-coef, kind="stable")[:TOP]]),
        }
    return reference


def marker_recovery(report: dict, present: set[str], reference: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Canonical markers in the top 10 of each ranking: the statistics by two-sided p-value (genes absent
    from a cell type compete with its markers there), the statistics' markers (higher in the cell type,
    by statistic: scanpy's rank_genes_groups order) and the model ranking; then the pooled yardsticks of
    :func:`pooled_reference`."""
    rows = []
    for name, markers in CANONICAL.items():
        if name not in report["endpoints"]:
            continue
        known = [m for m in markers if m in present]
        stats = report["biomarkers"]["statistics"].get(name, [])
        top = {
            "statistics": [r["feature"] for r in stats[:TOP]],
            "markers": [r["feature"] for r in report["biomarkers"]["markers"].get(name, [])[:TOP]],
            "model": [r["feature"] for r in report["biomarkers"]["model"].get(name, [])[:TOP]],
            **reference.get(name, {}),
        }
        hits = {source: [f for f in features if f in known] for source, features in top.items()}
        rows.append({"endpoint": name, "present": len(known), "of": len(markers), "top": top, "hits": hits})
    return rows


def verdict(row: dict) -> str:
    """The brief's targets, judged on the statistics in rank_genes_groups order (up in the cell type,
    the order of the pooled Welch reference the brief quotes) and on the model ranking; next to them
    what the pooled yardsticks get on the same cells."""
    hits = {source: len(found) for source, found in row["hits"].items()}
    seen = (
        f"statistics {hits['markers']} (pooled welch t {hits.get('pooled welch t', 'n/a')}), "
        f"model {hits['model']} (pooled logistic {hits.get('pooled logistic', 'n/a')})"
    )
    target = TARGETS.get(row["endpoint"])
    if target is None:
        return f"{seen}: no target set"
    met = hits["markers"] >= target[0] and hits["model"] >= target[1]
    return f"{seen}; target >= {target[0]} and >= {target[1]}: {'MET' if met else 'NOT MET'}"


def print_recovery(rows: list[dict]) -> None:
    for row in rows:
        counts = ", ".join(f"{source} {len(hits)}" for source, hits in row["hits"].items())
        print(
            f"{row['endpoint']}: {row['present']} of {row['of']} canonical markers in the panel; hits in the top "
            f"{TOP}: {counts}"
        )
        for source, features in row["top"].items():
            print(f"    {source:16} {len(row['hits'][source])} {row['hits'][source]}  top: {', '.join(features)}")


def run_one(
    out: Path, dataset: str, split: str | None, *, folds: int, seed: int, resume: bool, stats_only: bool = False
) -> dict:
    label = dataset if split is None else f"{dataset}-{split}"
    folder = out / label
    print(f"\n===== {label} =====", flush=True)
    if dataset == "pbmc":
        data, spec = pbmc_members(split=split, floor=folds + 3, seed=seed)
    else:
        data, spec = gse7390_members(seed=seed)
    present = set(next(iter(data.values())).var_names)
    run_dir = folder / "run"
    if resume and (run_dir / "report.json").exists():
        print(f"reusing {run_dir / 'report.json'}")
        report = json.loads((run_dir / "report.json").read_text())
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a half-written run of ours (only reached with --resume)
        config = write_consortium(folder, data, spec, dataset=dataset, seed=seed)
        report = run_stats(config, run_dir) if stats_only else run_cli(config, run_dir, folds=folds)
    if not stats_only:
        print(f"\n{label}: test figures over all members' out-of-fold samples, 95% bootstrap intervals")
        print_metrics(report)
    result = {"label": label, "endpoints": report["endpoints"]}
    if dataset == "pbmc":
        result["recovery"] = marker_recovery(report, present, pooled_reference(data))
        print(f"\n{label}: canonical-marker recovery")
        print_recovery(result["recovery"])
    else:
        for name in report["endpoints"]:
            top = [r["feature"] for r in report["biomarkers"]["statistics"].get(name, [])[:TOP]]
            print(f"{name}: top {TOP} probes by the federated Cox score test: {', '.join(top)}")
    return result


def print_acceptance(results: list[dict]) -> None:
    print("\n===== acceptance =====")
    for result in results:
        for row in result.get("recovery", []):
            print(f"{result['label']:15} {row['endpoint']:10} {verdict(row)}")
        if result["label"] == "gse7390":
            for name, e in result["endpoints"].items():
                linear_ci = e.get("ci", {}).get("linear_pooled") or [None]
                fed, pooled, low = e.get("federated"), e.get("pooled"), linear_ci[0]
                if None in (fed, pooled, low):
                    print(f"{result['label']:15} {name}: figures missing (federated {fed}, pooled {pooled})")
                    continue
                close, above = abs(fed - pooled) <= 0.02, fed >= low
                print(
                    f"{result['label']:15} {name}: federated {fed:.3f} vs pooled {pooled:.3f} "
                    f"(|diff| {abs(fed - pooled):.3f} <= 0.02: {close}); not below the linear_pooled interval "
                    f"(low {low:.3f}): {above} -> {'MET' if close and above else 'NOT MET'}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder (empty, or reused with --resume)")
    parser.add_argument("--datasets", default="pbmc,gse7390", help="comma-separated: pbmc, gse7390")
    parser.add_argument("--splits", default="random,skewed", help="pbmc member splits: random, skewed")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out")
    parser.add_argument("--stats-only", action="store_true", help="consortium stats instead of run (no training)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        parser.error(f"--out {args.out} is not empty: give an empty folder, or --resume to reuse its finished runs")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = sorted(set(datasets) - {"pbmc", "gse7390"}) + sorted(set(splits) - {"random", "skewed"})
    if unknown:
        parser.error(f"unknown dataset or split {unknown}; datasets: pbmc, gse7390; splits: random, skewed")
    jobs = [("pbmc", s) for s in splits if "pbmc" in datasets] + [("gse7390", None)] * ("gse7390" in datasets)
    results, failures = [], []
    for dataset, split in jobs:
        try:
            results.append(
                run_one(
                    args.out,
                    dataset,
                    split,
                    folds=args.folds,
                    seed=args.seed,
                    resume=args.resume,
                    stats_only=args.stats_only,
                )
            )
        except RuntimeError as exc:
            failures.append(str(exc))
            print(f"FAILED: {exc}", flush=True)
    print_acceptance(results)
    if failures:
        sys.exit(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
