"""Where a federated run's time and memory go: FLARE's overhead over the members' own compute.

    python benchmarks/overhead.py --out DIR                       # sim plaintext, POC plaintext and HE
    python benchmarks/overhead.py --out DIR --envs sim --no-poc-he --scaling [--big]

For each environment (simulator plaintext; POC plaintext and HE) it runs the synthetic consortium
(``consortium synth`` defaults: 3 members of 300/800/2000 samples x 2000 features) for ``--rounds``
rounds and prints: start -> end of round 0, the steady round against the slowest member's compute in
it (the difference is FLARE's overhead), the last round, what follows it until the run returns
(teardown, release, report, MLflow), bytes per shared parameter and peak memory (per member process,
and the whole run). The floor is a plain PyTorch loop over the same members' data in this process.
Then it times ``consortium run --env sim --no-he --rounds 2`` on ``consortium synth``'s defaults, as a user
types it (``--cli-repeats`` times, fresh processes). ``--scaling`` adds a simulator table over 3/8
members x 2k features (``--big``: 16 members and 20k).
``--attribution`` compares the last round's biomarker ranking over every train sample with the bounded
one the sites use (:data:`jobs.site.ATTRIBUTION_STEPS` path points over at most
:data:`jobs.site.ATTRIBUTION_ROWS_PER_GROUP` samples per group, against 32 points over every sample):
precision at k against the planted
biomarkers, and seconds, per member and endpoint.

Timings come from what a run records: each site's published record (``published.jsonl`` on the
server) holds its compute seconds, the wall time it finished a round and its peak resident memory;
the whole run's memory is sampled from the processes under the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from consortium.commands.synth import synthesize
from consortium.orchestration import run_consortium
from consortium.results import read_records
from consortium.run_options import RunOptions
from consortium.run_plan import RunPlan
from jobs.recipe import server_model
from jobs.site import (
    ATTRIBUTION_BOOTSTRAPS,
    ATTRIBUTION_ROWS_PER_GROUP,
    ATTRIBUTION_STEPS,
    MemberSite,
    peak_rss_mb,
)
from jobs.site_outputs import SiteOutputs
from models.attribution import precision_at_k, rank_features
from models.network import SharedModel
from models.training import LocalTrainer, TrainSettings
from schema import settings
from schema.config import ConsortiumConfig, dump_config, load_config

SMALL_SIZES = (300, 800, 2000)
CONSORTIUM = [sys.executable, "-m", "consortium.cli"]


class MemorySampler:
    """Peak summed resident memory of this process and every process whose command line names ``folder``,
    and the peak proportional set size (PSS) of the largest such process other than this one.

    RSS counts a shared library's pages in every process that maps them (torch's alone is ~75 MB), so 16
    members' RSS overstate what they take from the machine together; PSS splits each shared page among
    the processes that share it, and the processes' PSS add up to what they use."""

    def __init__(self, folder: Path, *, every: float = 0.5) -> None:
        self.marker, self.every = str(Path(folder).resolve()).encode(), every
        self.peak_mb = 0.0
        self.peak_pss_mb = 0.0
        self.largest_pss_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self.every):
            rss, pss = self.sample()
            self.peak_mb = max(self.peak_mb, sum(rss.values()))
            self.peak_pss_mb = max(self.peak_pss_mb, sum(pss.values()))
            others = [v for pid, v in pss.items() if pid != os.getpid()]
            self.largest_pss_mb = max([self.largest_pss_mb, *others])

    def sample(self) -> tuple[dict[int, float], dict[int, float]]:
        """RSS and PSS in MB by process id."""
        rss, pss = {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                pid = int(entry.name)
                if pid != os.getpid() and self.marker not in (entry / "cmdline").read_bytes():
                    continue
                for line in (entry / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss[pid] = int(line.split()[1]) / 1024.0
                    elif line.startswith("Pss:"):
                        pss[pid] = int(line.split()[1]) / 1024.0
        return rss, pss


def shared_parameters(config: ConsortiumConfig) -> int:
    """Parameters a member sends every round: the trunk and the heads of shared endpoints."""
    model = SharedModel(**server_model(config)["args"])
    return sum(p.numel() for p in model.parameters())


def plain_pytorch_floor(config: ConsortiumConfig, *, rounds: int, scratch: Path) -> dict[str, float]:
    """The same members' local training and validation, one after another in this process, no FLARE:
    per round, the slowest member's seconds (the floor of a federated round)."""
    per_round: list[float] = []
    trainers = []
    for member in config.members:
        site = MemberSite(config, member.name, outputs=SiteOutputs(scratch / member.name))
        trainer = LocalTrainer(
            site.model,
            site.data,
            site.tasks,
            settings=TrainSettings(**settings.train_settings(config)),
            planned_epochs=settings.planned_epochs(config, rounds=rounds),
        )
        trainers.append(trainer)
    for _ in range(rounds):
        slowest = 0.0
        for trainer in trainers:
            started = time.perf_counter()
            trainer.train(epochs=config.training.local_epochs)
            trainer.evaluate("val")
            slowest = max(slowest, time.perf_counter() - started)
        per_round.append(slowest)
    return {"round_s": statistics.median(per_round[1:] or per_round), "first_round_s": per_round[0]}


def attribution_quality(config_path: Path, *, rounds: int, scratch: Path) -> list[dict[str, Any]]:
    """Each member's network trained alone for ``rounds`` rounds, ranked over every train sample and
    over the bounded draw: precision at k (k = the planted biomarkers) and seconds of each."""
    config = load_config(config_path)
    truth = json.loads((config_path.parent / "ground_truth.json").read_text())["tasks"]
    rows = []
    for member in config.members:
        site = MemberSite(config, member.name, outputs=SiteOutputs(scratch / member.name))
        trainer = LocalTrainer(
            site.model, site.data, site.tasks, settings=TrainSettings(**settings.train_settings(config))
        )
        trainer.train(epochs=rounds * config.training.local_epochs)
        train = site.data.subset("train")
        for task in site.tasks:
            row: dict[str, Any] = {"member": member.name, "task": task.name, "kind": task.kind, "n": len(train.X)}
            for label, cap, steps in (("all", None, 32), ("bounded", ATTRIBUTION_ROWS_PER_GROUP, ATTRIBUTION_STEPS)):
                started = time.perf_counter()
                table = rank_features(
                    site.model,
                    train.X,
                    task.name,
                    feature_names=list(site.data.feature_names),
                    labels=train.targets[task.name] if task.kind == "binary" else None,
                    n_boot=ATTRIBUTION_BOOTSTRAPS,
                    n_steps=steps,
                    max_per_group=cap,
                    seed=config.training.seed,
                )
                row[f"{label}_precision"] = precision_at_k(table, truth[task.name])
                row[f"{label}_s"] = time.perf_counter() - started
            rows.append(row)
            print(f"attribution: {json.dumps(row)}", flush=True)
    return rows


def print_attribution(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n| member | endpoint | train samples | precision at k, all | bounded ({ATTRIBUTION_STEPS} steps, "
        f"{ATTRIBUTION_ROWS_PER_GROUP}/group) "
        "| seconds, all | bounded |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['member']} | {r['task']} ({r['kind']}) | {r['n']} | {r['all_precision']:.3f} | "
            f"{r['bounded_precision']:.3f} | {r['all_s']:.1f} | {r['bounded_s']:.1f} |"
        )


def run_case(config_path: Path, *, env: str, he: bool, rounds: int, out: Path) -> dict[str, Any]:
    """One federated run; its figures from the sites' published records."""
    config = load_config(config_path)
    started = time.time()
    error = None
    with MemorySampler(out) as memory:
        try:
            plan = RunPlan.build(config, RunOptions(out=out, env=env, rounds=rounds, he=he))
            seconds_total = run_consortium(plan).report["timing"]["seconds_total"]
        except Exception as exc:  # a failure after the job (release, report, MLflow) still leaves its records
            error, seconds_total = f"{type(exc).__name__}: {exc}", None
    returned = time.time()
    records = read_records(out / "flare")
    if error and (not records or any(len(r) < rounds for r in records.values())):
        raise RuntimeError(f"{env} run in {out} failed: {error}")
    ends = [max(r[i]["finished_at"] for r in records.values()) for i in range(rounds)]
    compute = [max(r[i]["seconds"] for r in records.values()) for i in range(rounds)]
    steady = list(range(1, rounds - 1))
    round_s = [ends[i] - ends[i - 1] for i in steady]
    overhead = [round_s[k] - compute[i] for k, i in enumerate(steady)]
    bytes_per_round = [statistics.mean(r[i]["bytes_received"] for r in records.values()) for i in range(rounds - 1)]
    per_parameter = statistics.mean(bytes_per_round) / shared_parameters(config) if bytes_per_round else None
    return {
        "env": env,
        "he": he,
        "members": len(config.members),
        "features": len(config.panel_features()),
        "rounds": rounds,
        "wall_s": returned - started,
        "start_to_round0_s": ends[0] - started,
        "steady_round_s": statistics.median(round_s) if round_s else None,
        "steady_compute_s": statistics.median(compute[i] for i in steady) if steady else None,
        "overhead_s": statistics.median(overhead) if overhead else None,
        "last_round_s": ends[-1] - ends[-2] if rounds > 1 else None,
        "last_compute_s": compute[-1],
        "after_last_round_s": returned - ends[-1],
        "bytes_per_parameter": per_parameter,
        "member_peak_mb": max(r[-1].get("peak_rss_mb") or 0.0 for r in records.values()),
        "run_peak_mb": memory.peak_mb,
        "largest_process_pss_mb": memory.largest_pss_mb,
        "run_peak_pss_mb": memory.peak_pss_mb,
        "report_seconds_total": seconds_total,
        "error": error,
    }


def two_round_command(root: Path, *, repeats: int) -> dict[str, Any]:
    """The issue's yardstick, as a user types it: ``consortium synth`` (defaults), then ``consortium run
    --env sim --no-he --rounds 2`` timed from the command's start to its exit, ``repeats`` times in a row
    (fresh processes; each run in a fresh folder)."""
    synth = root / "cli-synth"
    if not (synth / "consortium.yaml").exists():
        subprocess.run([*CONSORTIUM, "synth", "--out", str(synth)], check=True, capture_output=True, text=True)
    seconds = []
    for index in range(repeats):
        run_dir = root / f"cli-run-{index}"
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [*CONSORTIUM, "run", "--config", str(synth / "consortium.yaml"), "--env", "sim", "--no-he"]
        started = time.perf_counter()
        done = subprocess.run([*command, "--rounds", "2", "--out", str(run_dir)], capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"consortium run failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"repeats": repeats, "seconds": seconds, "median_s": statistics.median(seconds)}


def consortium_of(root: Path, *, members: int, features: int, seed: int, ports: tuple[int, int] | None = None) -> Path:
    """The synthetic consortium (made once under ``root``); ``ports``: the operator's FL and admin ports."""
    sizes = list(SMALL_SIZES) if members == 3 else [SMALL_SIZES[i % len(SMALL_SIZES)] for i in range(members)]
    folder = root / f"synth-{members}x{features}"
    path = folder / "consortium.yaml"
    if not path.exists():
        synthesize(folder, sizes=sizes, n_features=features, seed=seed)
    if ports is not None:
        config = load_config(path)
        operator = config.operator.model_copy(update={"fl_port": ports[0], "admin_port": ports[1]})
        dump_config(config.model_copy(update={"operator": operator}), path)
    return path


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


ROWS = [
    ("start -> end of round 0", "start_to_round0_s", " s"),
    ("steady round", "steady_round_s", " s"),
    ("slowest member's compute in it", "steady_compute_s", " s"),
    ("overhead (round - compute)", "overhead_s", " s"),
    ("last round", "last_round_s", " s"),
    ("slowest member's last-round compute", "last_compute_s", " s"),
    ("after the last round until the run returns", "after_last_round_s", " s"),
    ("whole run (wall)", "wall_s", " s"),
    ("bytes per shared parameter (upload)", "bytes_per_parameter", ""),
    ("peak memory, largest member process", "member_peak_mb", " MB"),
    ("peak memory, whole run", "run_peak_mb", " MB"),
    ("peak PSS, largest FLARE process", "largest_process_pss_mb", " MB"),
    ("peak PSS, whole run", "run_peak_pss_mb", " MB"),
]


def print_cases(cases: list[dict[str, Any]], floor: dict[str, float]) -> None:
    names = [f"{c['env']} {'HE' if c['he'] else 'plain'}" for c in cases]
    width = max(len(r[0]) for r in ROWS) + 2
    print("| " + " | ".join(["figure".ljust(width), *names]) + " |")
    print("|" + "|".join(["-" * (width + 2), *["-" * (len(n) + 2) for n in names]]) + "|")
    for label, key, unit in ROWS:
        print("| " + " | ".join([label.ljust(width), *[_fmt(c[key], unit) for c in cases]]) + " |")
    print(f"\nfloor, plain PyTorch over the same data (slowest member per round): {floor['round_s']:.2f} s")


def print_scaling(cells: list[dict[str, Any]]) -> None:
    print(
        "\n| members | features | wall | steady round | overhead | last round | member peak RSS | run peak RSS "
        "| largest process PSS | run peak PSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c['members']} | {c['features']} | {_fmt(c['wall_s'], ' s')} | {_fmt(c['steady_round_s'], ' s')} | "
            f"{_fmt(c['overhead_s'], ' s')} | {_fmt(c['last_round_s'], ' s')} | {_fmt(c['member_peak_mb'], ' MB')} | "
            f"{_fmt(c['run_peak_mb'], ' MB')} | {_fmt(c['largest_process_pss_mb'], ' MB')} | "
            f"{_fmt(c['run_peak_pss_mb'], ' MB')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (at least 3: a steady round)")
    parser.add_argument("--envs", default="sim,poc", help="comma-separated: sim, poc")
    parser.add_argument("--no-poc-he", action="store_true", help="skip the POC run with HE")
    parser.add_argument("--scaling", action="store_true", help="add the member/feature table (simulator)")
    parser.add_argument("--big", action="store_true", help="scaling with 16 members and 20k features too")
    parser.add_argument("--cells", default=None, help="only these scaling cells, e.g. 16x20000 (implies --scaling)")
    parser.add_argument("--attribution", action="store_true", help="bounded vs full attribution quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ports", default=None, help="POC's FL and admin ports, e.g. 8202,8203 (default: synth's)")
    parser.add_argument(
        "--cli-repeats", type=int, default=3, help="times the 3-member, 2-round simulator command is timed (0: not)"
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 0, a steady round, the last round)")
    out = (args.out or Path(tempfile.mkdtemp(prefix="overhead-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ports = tuple(int(p) for p in args.ports.split(",")) if args.ports else None
    config_path = consortium_of(out, members=3, features=2000, seed=args.seed, ports=ports)
    floor = plain_pytorch_floor(load_config(config_path), rounds=args.rounds, scratch=out / "floor")
    cases = []
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    for env in envs:
        for he in (False, True) if env == "poc" and not args.no_poc_he else (False,):
            name = f"{env}-{'he' if he else 'plain'}"
            cases.append(run_case(config_path, env=env, he=he, rounds=args.rounds, out=out / name))
            print(f"{name}: {json.dumps(cases[-1])}", flush=True)
    print_cases(cases, floor)
    command = two_round_command(out, repeats=args.cli_repeats) if args.cli_repeats else None
    if command:
        runs = ", ".join(f"{s:.1f}" for s in command["seconds"])
        median = command["median_s"]
        print(f"\n`consortium run --env sim --no-he --rounds 2` (synth defaults): {runs} s; median {median:.1f} s")
    cells = []
    if args.scaling or args.cells:
        grid = [(m, f) for f in (2000, 20000) for m in (3, 8, 16)]
        grid = [(m, f) for m, f in grid if args.big or (m <= 8 and f <= 2000)]
        if args.cells:
            grid = [tuple(int(n) for n in cell.split("x")) for cell in args.cells.split(",")]
        for members, features in grid:
            cell_config = consortium_of(out, members=members, features=features, seed=args.seed)
            cells.append(run_case(cell_config, env="sim", he=False, rounds=3, out=out / f"scale-{members}x{features}"))
            print(f"scale {members}x{features}: {json.dumps(cells[-1])}", flush=True)
        print_scaling(cells)
    quality = []
    if args.attribution:
        quality = attribution_quality(config_path, rounds=args.rounds, scratch=out / "attribution")
        print_attribution(quality)
    figures = {"cases": cases, "floor": floor, "command": command, "scaling": cells, "attribution": quality}
    (out / "overhead.json").write_text(json.dumps({**figures, "this_process_peak_mb": peak_rss_mb()}, indent=2))
    print(f"\nfigures in {out / 'overhead.json'}")


if __name__ == "__main__":
    main()
