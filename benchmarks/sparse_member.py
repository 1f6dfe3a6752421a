"""A synthetic single-cell member in sparse form: what `data check`, `stats` and a 2-round sim run cost it.

    python benchmarks/sparse_member.py --cells 20000 [--genes 20000] [--density 0.03] [--out DIR]
    python benchmarks/sparse_member.py --cells 200000 --skip-run      # the issue's size, without FLARE

It writes one member of ``--cells`` cells x ``--genes`` genes of counts at ``--density`` (CSR in the
h5ad), a binary endpoint per donor (``--donors`` donors; the statistics are on their pseudobulk samples)
and a consortium.yaml around it, then runs, each in a fresh process as a user types them:
``consortium data check``, ``consortium stats --no-he`` and ``consortium run --rounds 2 --no-he`` (the
simulator), printing each one's wall time and peak resident memory (the largest process of its tree;
for the run, also the member site's own peak from its published record). In this process it then loads
the member as a site does and times one local epoch of :class:`models.training.LocalTrainer` against a
plain PyTorch loop over the same CSR rows (the same network, batch size and optimizer: each batch's rows
made dense and scaled, forward, backward, step), and prints this process's peak memory and the size of
the CSR matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "consortium.cli"]
MEMBER = "sc"


def counts_matrix(cells: int, genes: int, *, density: float, seed: int, signal: np.ndarray) -> sp.csr_matrix:
    """CSR float32 counts, built one block of cells at a time (never dense); ``signal`` (per cell, 0/1)
    raises the first 20 genes' counts in the signalling cells."""
    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // genes)
    data, indices, lengths = [], [], []
    for start in range(0, cells, block):
        rows = min(block, cells - start)
        size = rng.binomial(rows * genes, density)
        flat = np.unique(rng.integers(0, rows * genes, size=size, dtype=np.int64))
        row, col = np.divmod(flat, genes)
        values = rng.poisson(2.0, size=flat.size).astype(np.float32) + 1.0
        values[col < 20] += 3.0 * signal[start + row[col < 20]]
        data.append(values)
        indices.append(col.astype(np.int32))
        lengths.append(np.bincount(row, minlength=rows))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(cells, genes))


def write_member(
    folder: Path, *, cells: int, genes: int, density: float, donors: int, seed: int, reuse: bool = False
) -> Path:
    """The member's h5ad (kept with ``reuse`` when the folder holds one) and a one-member consortium.yaml;
    returns the config's path."""
    names = [f"GENE{i}" for i in range(genes)]
    if not (reuse and (folder / "member.h5ad").is_file()):
        rng = np.random.default_rng(seed)
        donor = rng.integers(0, donors, cells)
        response = (np.arange(donors) % 2).astype(float)[donor]
        X = counts_matrix(cells, genes, density=density, seed=seed + 1, signal=response)
        index = [f"c{i}" for i in range(cells)]
        obs = pd.DataFrame({"donor": [f"d{d}" for d in donor], "response": response}, index=index)
        ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names)).write_h5ad(folder / "member.h5ad")
    (folder / "panel.txt").write_text("\n".join(names) + "\n")
    raw = {
        "name": "sparse-member",
        "operator": {"org": "op"},
        "panel": {"file": "panel.txt"},
        "data": {"min_class_count": 2, "min_events": 2, "min_labeled": 10},
        "training": {"rounds": 2, "local_epochs": 1},
        "members": [
            {
                "name": MEMBER,
                "org": "Org_SC",
                "data": "member.h5ad",
                "sample_column": "donor",
                "tasks": [{"name": "resp", "type": "binary", "column": "response"}],
            }
        ],
    }
    (folder / "consortium.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "consortium.yaml"


def _tree_rss_mb(pid: int) -> float:
    """Largest resident memory among ``pid`` and its descendants now (MB), from /proc."""
    largest, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        largest = max(largest, int(line.split()[1]) / 1024)
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return largest


def timed(command: list[str], *, cwd: Path, echo: bool = False) -> dict[str, float]:
    """Run ``command``; its wall seconds, exit status and the largest process of its tree (sampled)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if echo:
        print(output.strip(), flush=True)
    elif process.returncode not in (0, 1):
        print(output[-4000:], file=sys.stderr)
    return {"seconds": time.perf_counter() - started, "rc": process.returncode, "peak_mb": peak[0]}


def site_peak_mb(run_folder: Path) -> float | None:
    """The member site's own peak RSS (MB) from the run's published records, if the run kept them."""
    peaks = []
    for path in run_folder.rglob("published*.jsonl"):
        for line in path.read_text().splitlines():
            with _ignored():
                peaks.append(float(json.loads(line).get("peak_rss_mb") or 0))
    return max(peaks) if peaks else None


class _ignored:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ValueError, TypeError, AttributeError))


def epoch_against_plain_loop(config_path: Path, *, repeats: int) -> dict[str, float]:
    """Seconds of one LocalTrainer epoch and of one plain PyTorch epoch over the same CSR rows (best of
    ``repeats`` each), in this process, on the member as its site loads it."""
    import torch

    from jobs import member_data
    from models.losses import multitask_loss
    from models.network import MultitaskNet
    from models.training import LocalTrainer, TrainSettings
    from schema import settings
    from schema.config import load_config

    config = load_config(config_path)
    loaded = member_data.load_member(config, MEMBER)
    data, tasks = loaded.data, member_data.task_specs(config, MEMBER)
    train_settings = TrainSettings(**settings.train_settings(config))
    model = MultitaskNet(data.n_features, tasks, **settings.network(config), seed=0)
    trainer = LocalTrainer(model, data, tasks, settings=train_settings)

    X = data.X  # ScaledRows over the member's CSR matrix
    matrix, mean, scale, clip = X.matrix, X.mean, X.scale, X.max_value
    train = np.flatnonzero(data.split == "train")
    y = torch.from_numpy(np.nan_to_num(data.targets["resp"][train]).astype(np.float32))
    plain_model = MultitaskNet(data.n_features, tasks, **settings.network(config), seed=0)
    optimizer = torch.optim.AdamW(
        plain_model.parameters(), lr=train_settings.learning_rate, weight_decay=train_settings.weight_decay
    )

    def plain_epoch() -> float:
        started = time.perf_counter()
        plain_model.train()
        for rows in torch.split(torch.randperm(train.size), train_settings.batch_size):
            index = rows.numpy()
            x = np.clip((matrix[train[index]].toarray() - mean) / scale, -clip, clip)
            optimizer.zero_grad(set_to_none=True)
            loss = multitask_loss(plain_model(torch.from_numpy(x)), {"resp": y[rows]}, tasks)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    times, platform = [], []
    for _ in range(repeats):  # alternating, the plain loop first, so that neither gets a warmer machine
        times.append(plain_epoch())
        platform.append(trainer.train(epochs=1).seconds)
    csr_mb = (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20
    return {
        "epoch_platform_s": min(platform),
        "epoch_plain_s": min(times),
        "train_cells": float(train.size),
        "csr_mb": csr_mb,
        "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _report(name: str, figures: dict[str, float]) -> None:
    print(
        f"{name:24s} rc {figures['rc']}  {figures['seconds']:7.1f} s  peak RSS {figures['peak_mb']:7.0f} MB", flush=True
    )


def _epoch_only(config: Path, *, repeats: int) -> int:
    epoch = epoch_against_plain_loop(config, repeats=repeats)
    print(
        f"one epoch over {epoch['train_cells']:.0f} train cells: platform {epoch['epoch_platform_s']:.1f} s, "
        f"plain PyTorch loop {epoch['epoch_plain_s']:.1f} s "
        f"(ratio {epoch['epoch_platform_s'] / epoch['epoch_plain_s']:.2f})"
    )
    peak = epoch["process_peak_mb"]
    print(f"CSR matrix {epoch['csr_mb']:.0f} MB; the member loaded and trained in {peak:.0f} MB peak RSS")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epoch-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=20_000, help="cells in the member (the issue's size: 200000)")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--donors", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="epochs timed for each loop (the best counts)")
    parser.add_argument("--skip-run", action="store_true", help="leave out the 2-round simulator run")
    parser.add_argument("--skip-checks", action="store_true", help="leave out `data check` and `stats`")
    parser.add_argument("--out", type=Path, default=None, help="folder to keep (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep the member file --out holds from an earlier run")
    args = parser.parse_args(argv)
    if args.epoch_only:
        return _epoch_only(args.epoch_only, repeats=args.repeats)
    folder = args.out or Path(tempfile.mkdtemp(prefix="sparse-member-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    started = time.perf_counter()
    config = write_member(
        folder,
        cells=args.cells,
        genes=args.genes,
        density=args.density,
        donors=args.donors,
        seed=args.seed,
        reuse=args.reuse,
    )
    print(
        f"member: {args.cells} cells x {args.genes} genes at {args.density:.0%} density, written in "
        f"{time.perf_counter() - started:.1f} s ({(folder / 'member.h5ad').stat().st_size / 2**20:.0f} MB h5ad)"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a fresh output folder each time: a folder holds one run
    stats, run = folder / f"stats-{stamp}", folder / f"run-{stamp}"
    steps = {
        "data check": ["data", "check", "--config", str(config), "--member", MEMBER],
        "stats": ["stats", "--config", str(config), "--out", str(stats), "--no-he"],
    }
    for name, command in steps.items() if not args.skip_checks else ():
        _report(name, timed(CLI + command, cwd=folder))
    epoch = timed(
        [sys.executable, __file__, "--epoch-only", str(config), "--repeats", str(args.repeats)], cwd=folder, echo=True
    )
    _report("epochs (one process)", epoch)
    if not args.skip_run:
        command = ["run", "--config", str(config), "--out", str(run), "--rounds", "2", "--no-he"]
        _report("run (sim, 2 rounds)", timed(CLI + command, cwd=folder))
        site = site_peak_mb(run)
        print(f"member site's own peak RSS in the run: {site:.0f} MB" if site else "member site's peak: not recorded")
    print(f"files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
