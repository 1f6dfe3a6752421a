"""A member read from its file in chunks against the same member read into memory: peak memory and time.

    python benchmarks/chunked_member.py --cells 100000 [--genes 20000] [--density 0.03] [--out DIR]

It writes one member of ``--cells`` samples (cells, each its own sample: no pseudobulk) x ``--genes``
features of counts at ``--density`` (CSR in the h5ad; ``benchmarks/sparse_member.py``'s generator) with a
binary endpoint and a consortium.yaml around it, then, in a fresh process for each way of reading
(``members[].read: memory`` and ``chunks``): loads the member as its site does, computes the endpoint's
statistics pieces and the pooled-scaling pieces, and trains ``--epochs`` local epochs, printing each
step's seconds, the process's peak resident memory, the CSR matrix's size, and the largest difference
between the two ways' statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_member import counts_matrix  # a sibling script, not a package

ROOT = Path(__file__).resolve().parents[1]
MEMBER = "cells"


def write_member(folder: Path, *, cells: int, genes: int, density: float, seed: int, reuse: bool = False) -> Path:
    """The member's h5ad (kept with ``reuse`` when the folder holds one) and one consortium.yaml per way
    of reading (``consortium-memory.yaml``, ``consortium-chunks.yaml``); returns the folder."""
    names = [f"GENE{i}" for i in range(genes)]
    if not (reuse and (folder / "member.h5ad").is_file()):
        rng = np.random.default_rng(seed)
        response = (rng.random(cells) < 0.5).astype(float)
        X = counts_matrix(cells, genes, density=density, seed=seed + 1, signal=response)
        obs = pd.DataFrame({"response": response}, index=[f"c{i}" for i in range(cells)])
        ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names)).write_h5ad(folder / "member.h5ad")
    (folder / "panel.txt").write_text("\n".join(names) + "\n")
    for read in ("memory", "chunks"):
        raw = {
            "name": "chunked-member",
            "operator": {"org": "op"},
            "panel": {"file": "panel.txt"},
            "data": {"min_class_count": 2, "min_events": 2, "min_labeled": 10},
            "training": {"rounds": 1, "local_epochs": 1},
            "members": [
                {
                    "name": MEMBER,
                    "org": "Org_Cells",
                    "data": "member.h5ad",
                    "read": read,
                    "tasks": [{"name": "resp", "type": "binary", "column": "response"}],
                }
            ],
        }
        (folder / f"consortium-{read}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def peak_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM``, which starts afresh at exec (``ru_maxrss`` would
    carry the parent's resident memory at the fork, the member generator's matrix included)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(config_path: Path, *, epochs: int, out: Path) -> dict[str, float]:
    """Load, statistics, scaling pieces and ``epochs`` epochs in this process; the statistics go to ``out``."""
    from jobs import member_data
    from jobs.site_statistics import SiteStatistics
    from models.network import MultitaskNet
    from models.training import LocalTrainer, TrainSettings
    from schema import settings
    from schema.config import load_config

    config = load_config(config_path)
    figures: dict[str, float] = {}
    started = time.perf_counter()
    loaded = member_data.load_member(config, MEMBER)
    figures["load_s"] = time.perf_counter() - started
    figures["after_load_mb"] = peak_mb()
    started = time.perf_counter()
    sections = SiteStatistics(config, MEMBER, loaded.statistics).sections()
    tasks = member_data.task_specs(config, MEMBER)
    pieces = member_data.scaling_pieces(loaded.data, loaded.log_expression, loaded.measured, tasks=tasks, minimum=2)
    figures["statistics_s"] = time.perf_counter() - started
    np.savez(out, **sections, **pieces)
    if epochs:
        model = MultitaskNet(loaded.data.n_features, tasks, **settings.network(config), seed=0)
        trainer = LocalTrainer(model, loaded.data, tasks, settings=TrainSettings(**settings.train_settings(config)))
        started = time.perf_counter()
        trainer.train(epochs=epochs)
        figures["epochs_s"] = time.perf_counter() - started
    figures["peak_mb"] = peak_mb()
    return figures


def csr_mb(path: Path) -> float:
    """The member's CSR matrix in memory (values, column indices, row offsets), from the file."""
    from omics.chunked import H5Matrix

    return H5Matrix(path).nbytes / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs trained in each process (0: none)")
    parser.add_argument("--only", choices=("memory", "chunks"), default=None, help="run one way of reading only")
    parser.add_argument("--out", type=Path, default=None, help="folder to keep (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep the member file --out holds from an earlier run")
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.stage, epochs=args.epochs, out=args.stage_out)))
        return 0
    folder = args.out or Path(tempfile.mkdtemp(prefix="chunked-member-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_member(folder, cells=args.cells, genes=args.genes, density=args.density, seed=args.seed, reuse=args.reuse)
    h5ad = folder / "member.h5ad"
    print(
        f"member: {args.cells} cells x {args.genes} genes at {args.density:.0%} density, written in "
        f"{time.perf_counter() - started:.1f} s ({h5ad.stat().st_size / 2**20:.0f} MB h5ad, "
        f"CSR {csr_mb(h5ad):.0f} MB in memory)",
        flush=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for read in ("memory", "chunks") if args.only is None else (args.only,):
        command = [sys.executable, __file__, "--stage", str(folder / f"consortium-{read}.yaml")]
        command += ["--stage-out", str(folder / f"statistics-{read}.npz"), "--epochs", str(args.epochs)]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        f = json.loads(done.stdout.strip().splitlines()[-1])
        trained = f" | {args.epochs} epoch(s) {f['epochs_s']:.1f} s" if "epochs_s" in f else ""
        print(
            f"read: {read:7s} load {f['load_s']:6.1f} s | statistics {f['statistics_s']:6.1f} s{trained} | "
            f"peak RSS after load {f['after_load_mb']:6.0f} MB, at the end {f['peak_mb']:6.0f} MB",
            flush=True,
        )
    if args.only is None:
        memory, chunks = np.load(folder / "statistics-memory.npz"), np.load(folder / "statistics-chunks.npz")
        worst = max(float(np.max(np.abs(chunks[k] - memory[k]) / np.maximum(1.0, np.abs(memory[k])))) for k in memory)
        print(f"statistics, chunks against memory: largest difference {worst:.2e} (relative, or absolute below 1)")
    print(f"files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
