"""Plaintext vs our packed HE vs NVFlare's stock HE, one round of FedAvg over the shared trunk.

Each scheme runs its real FLARE components, in this process, on the consortium's default trunk
(``models.SharedTrunk``: 2000 features x [256, 64] = 529,344 parameters):

- ``plaintext``: the Client API result (``WEIGHTS``), NVFlare's ``InTimeAccumulateWeightedAggregator``;
- ``ours``: ``jobs.he`` (``EncryptWeightedUpdate`` -> ``CiphertextSumAggregator`` ->
  ``EncryptedAggregateShareableGenerator`` -> ``DecryptAggregate``), CKKS N=8192, [60, 40], 2^40;
- ``stock``: ``nvflare.app_opt.he`` (``HEModelEncryptor`` -> ``HEInTimeAccumulateWeightedAggregator`` ->
  ``HEModelShareableGenerator`` -> ``HEModelDecryptor``), CKKS N=8192, [60, 40, 40], 2^40 (HEBuilder's).

Every message crosses a simulated wire: FOBS-serialized by the sender and deserialized by the
receiver, as FLARE does; its size is the bytes sent. "round s" adds, one after the other on this
machine, the slowest member's encryption, all (de)serializations, the server's aggregation and the
slowest member's decryption (members would run theirs in parallel). Not included: FLARE's task
polling and network latency (seconds per round on POC, the same for all three schemes).

    PYTHONPATH=. python benchmarks/he_benchmark.py [--members 3] [--features 2000] [--widths 256 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs

STEPS_PER_MEMBER = (40, 64, 25, 50, 33, 70, 12, 45)


@dataclass
class RoundFigures:
    scheme: str
    encrypt_s: float = 0.0  # slowest member
    wire_s: float = 0.0  # all FOBS (de)serializations of the round
    aggregate_s: float = 0.0  # server: accept all + aggregate + shareable generator
    decrypt_s: float = 0.0  # slowest member
    upload_bytes: int = 0  # one member's result
    download_bytes: int = 0  # the global model sent to one member
    max_error: float = 0.0  # vs float64 weighted FedAvg

    @property
    def round_s(self) -> float:
        return self.encrypt_s + self.wire_s + self.aggregate_s + self.decrypt_s

    def bytes_per_round(self, members: int) -> int:
        return members * (self.upload_bytes + self.download_bytes)


def default_trunk(n_features: int, widths: list[int], *, seed: int = 0) -> dict[str, np.ndarray]:
    from models.network import SharedTrunk

    trunk = SharedTrunk(n_features, trunk_widths=widths, seed=seed)
    return {k: v.detach().numpy().astype(np.float32) for k, v in trunk.state_dict().items()}


def member_trunks(base: dict[str, np.ndarray], members: int, *, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(members)
    ]


def fedavg(trunks: list[dict[str, np.ndarray]], steps: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(steps))
    return {k: sum(n * t[k].astype(np.float64) for t, n in zip(trunks, steps, strict=True)) / total for k in trunks[0]}


class Wire:
    """FOBS both ways, timed; what a FLARE cell does to every message."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def send(self, shareable: Shareable) -> tuple[Shareable, int]:
        started = time.perf_counter()
        data = fobs.dumps(shareable)
        received = fobs.loads(data)
        self.seconds += time.perf_counter() - started
        return received, len(data)


def _timed(fn: Callable, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def _result(trunk: dict[str, np.ndarray], steps: int, site: str) -> Shareable:
    shareable = DXO(DataKind.WEIGHTS, data=dict(trunk), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    return shareable


class _QuietEngine:
    """Stands in for FLARE's engine: the components report events through it; nobody listens here."""

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        pass


def _server_ctx(root: Path | None = None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.put(ReservedKey.ENGINE, _QuietEngine(), private=True, sticky=False)
    if root is not None:
        fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(root_dir=str(root)), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    fl_ctx.set_peer_context(FLContext())
    return fl_ctx


def _max_error(received: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(received[k]).reshape(expected[k].shape) - expected[k]))) for k in expected
    )


def run_plaintext(trunks, steps) -> RoundFigures:
    figures, wire = RoundFigures("plaintext"), Wire()
    aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS)
    fl_ctx = _server_ctx()
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    results = []
    for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
        received, figures.upload_bytes = wire.send(_result(trunk, n, f"m{i}"))
        results.append(received)
    started = time.perf_counter()
    for received in results:
        aggregator.accept(received, fl_ctx)
    aggregate = aggregator.aggregate(fl_ctx)
    figures.aggregate_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(aggregate)
    figures.wire_s = wire.seconds
    figures.max_error = _max_error(from_shareable(task).data, fedavg(trunks, steps))
    return figures


def run_ours(trunks, steps) -> RoundFigures:
    from jobs.he.context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, make_contexts
    from jobs.he.filters import DecryptAggregate, EncryptWeightedUpdate
    from jobs.he.server import CiphertextSumAggregator, EncryptedAggregateShareableGenerator

    figures, wire = RoundFigures("ours"), Wire()
    client_bytes, server_bytes = make_contexts()
    with tempfile.TemporaryDirectory() as scratch:
        kits = {}
        for name, file, data in (
            ("member", CLIENT_CONTEXT_FILE, client_bytes),
            ("server", SERVER_CONTEXT_FILE, server_bytes),
        ):
            for sub in ("startup", "local"):
                (Path(scratch) / name / sub).mkdir(parents=True)
            (Path(scratch) / name / "startup" / file).write_bytes(data)
            kits[name] = _server_ctx(Path(scratch) / name)
        encrypt, decrypt = EncryptWeightedUpdate(), DecryptAggregate()
        aggregator, generator = CiphertextSumAggregator(), EncryptedAggregateShareableGenerator()
        encrypt.process(DXO(DataKind.METRICS, data={}).to_shareable(), kits["member"])  # loads nothing; warm-up
        (
            encrypt._context_for(kits["member"]),
            decrypt._context_for(kits["member"]),
            aggregator._context_for(kits["server"]),
        )
        results = []
        for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
            encrypted, seconds = _timed(encrypt.process, _result(trunk, n, f"m{i}"), kits["member"])
            figures.encrypt_s = max(figures.encrypt_s, seconds)
            received, figures.upload_bytes = wire.send(encrypted)
            results.append(received)
        started = time.perf_counter()
        for received in results:
            assert aggregator.accept(received, kits["server"])
        task = generator.learnable_to_shareable(
            generator.shareable_to_learnable(aggregator.aggregate(kits["server"]), kits["server"]), kits["server"]
        )
        figures.aggregate_s = time.perf_counter() - started
        task, figures.download_bytes = wire.send(task)
        plain, figures.decrypt_s = _timed(decrypt.process, task, kits["member"])
    figures.wire_s = wire.seconds
    figures.max_error = _max_error(from_shareable(plain).data, fedavg(trunks, steps))
    return figures


def run_stock(trunks, steps) -> RoundFigures:
    from nvflare.app_opt.he import decomposers
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
    from nvflare.lighter.impl.he import HEBuilder

    decomposers.register()
    figures, wire = RoundFigures("stock"), Wire()
    builder = HEBuilder()  # N=8192, [60, 40, 40], 2^40, exactly what POC/provisioning would write
    builder.initialize(None, None)
    client_ctx = ts.context_from(builder.get_serialized_context(is_client=True))
    server_ctx = ts.context_from(builder.get_serialized_context(is_client=False))
    encrypt = HEModelEncryptor(weigh_by_local_iter=True)
    encrypt.tenseal_context, encrypt.encrypt_layers = client_ctx, [True]
    decrypt = HEModelDecryptor()
    decrypt.tenseal_context = client_ctx
    aggregator = HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS, weigh_by_local_iter=False)
    generator = HEModelShareableGenerator()
    generator.tenseal_context = server_ctx
    fl_ctx = _server_ctx()
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    results = []
    for i, (trunk, n) in enumerate(zip(trunks, steps, strict=True)):
        encrypted, seconds = _timed(encrypt.process, _result(trunk, n, f"m{i}"), fl_ctx)
        figures.encrypt_s = max(figures.encrypt_s, seconds)
        received, figures.upload_bytes = wire.send(encrypted)  # FOBS attaches the context to every layer
        results.append(received)
    started = time.perf_counter()
    for received in results:
        assert aggregator.accept(received, fl_ctx)
    aggregate = aggregator.aggregate(fl_ctx)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable({}, {}), private=True, sticky=False)
    task = generator.learnable_to_shareable(generator.shareable_to_learnable(aggregate, fl_ctx), fl_ctx)
    figures.aggregate_s = time.perf_counter() - started
    task, figures.download_bytes = wire.send(task)
    plain, figures.decrypt_s = _timed(decrypt.process, task, fl_ctx)
    figures.wire_s = wire.seconds
    figures.max_error = _max_error(from_shareable(plain).data, fedavg(trunks, steps))
    return figures


def print_table(rows: list[RoundFigures], *, members: int, n_params: int) -> None:
    header = (
        f"{'scheme':<10} {'round s':>8} {'encrypt':>8} {'wire':>7} {'aggr.':>7} {'decrypt':>8} "
        f"{'up MB/member':>13} {'down MB/member':>15} {'MB/round':>9} {'B/param up':>11} {'max error':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.scheme:<10} {r.round_s:8.2f} {r.encrypt_s:8.2f} {r.wire_s:7.2f} {r.aggregate_s:7.2f} "
            f"{r.decrypt_s:8.2f} "
            f"{r.upload_bytes / 1e6:13.2f} {r.download_bytes / 1e6:15.2f} {r.bytes_per_round(members) / 1e6:9.1f} "
            f"{r.upload_bytes / n_params:11.2f} {r.max_error:10.1e}"
        )
    by_name = {r.scheme: r for r in rows}
    plain, ours, stock = by_name["plaintext"], by_name["ours"], by_name["stock"]
    print()
    print(
        f"bytes per round:   ours/plaintext {ours.bytes_per_round(members) / plain.bytes_per_round(members):5.1f}x   "
        f"stock/plaintext {stock.bytes_per_round(members) / plain.bytes_per_round(members):5.1f}x   "
        f"stock/ours {stock.bytes_per_round(members) / ours.bytes_per_round(members):5.1f}x"
    )
    print(
        f"upload per member: ours/plaintext {ours.upload_bytes / plain.upload_bytes:5.1f}x   "
        f"stock/plaintext {stock.upload_bytes / plain.upload_bytes:5.1f}x   "
        f"stock/ours {stock.upload_bytes / ours.upload_bytes:5.1f}x"
    )
    print(
        f"round seconds:     ours-plaintext {ours.round_s - plain.round_s:+.2f} s   "
        f"stock-plaintext {stock.round_s - plain.round_s:+.2f} s   stock/ours {stock.round_s / ours.round_s:5.1f}x"
    )


def median_figures(runs: list[RoundFigures]) -> RoundFigures:
    """Median of each timing over repeats (bytes and errors do not vary)."""
    out = runs[0]
    for name in ("encrypt_s", "wire_s", "aggregate_s", "decrypt_s"):
        setattr(out, name, float(np.median([getattr(r, name) for r in runs])))
    out.max_error = max(r.max_error for r in runs)
    return out


# -- end to end on POC ------------------------------------------------------------------------------


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")
_ROUND_STARTED = re.compile(r"Round (\d+) started")


def round_seconds(poc_workspace: Path) -> dict[int, float]:
    """Seconds from each round's start to the next one's, from the job's server log.

    The log comes back with the job result (``<admin>/transfer/<job>/workspace/log.txt``). FedAvg prints
    its "Round N started" banner without a time stamp: the last stamp before it counts. The last round
    has no successor and is left out.
    """
    starts: dict[int, datetime.datetime] = {}
    for log in poc_workspace.glob("*/prod_*/*/transfer/*/workspace/log.txt"):
        last = None
        for line in log.read_text(errors="replace").splitlines():
            stamp = _STAMP.match(line)
            if stamp:
                last = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            started = _ROUND_STARTED.search(line)
            if started and last is not None:
                starts.setdefault(int(started.group(1)), last)
    rounds = sorted(starts)
    return {r: (starts[r + 1] - starts[r]).total_seconds() for r in rounds if r + 1 in starts}


def run_poc(scheme: str, config_path: Path, out: Path, *, rounds: int, timeout: float = 900.0) -> dict:
    """One job of ``scheme`` on a fresh POC; returns job seconds and per-round seconds."""
    import yaml
    from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE
    from nvflare.recipe import PocEnv, add_experiment_tracking

    from jobs.biomarker_mtl.job import build_recipe, client_args, job_name, server_model
    from jobs.he.context import make_contexts
    from jobs.he.poc import HEPocEnv
    from jobs.runner import POC_ADMIN, poc_project
    from provisioning.policies import privacy_policy
    from schema.config import load_config

    config = load_config(config_path)
    members = [m.name for m in config.members]
    workspace = out / scheme
    workspace.mkdir(parents=True)
    project = workspace / "project.yml"
    project_config = poc_project(config)
    if scheme == "stock":  # stock HE: the operator's provisioning makes and signs the contexts
        project_config["builders"].insert(-1, {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}})
    project.write_text(yaml.safe_dump(project_config, sort_keys=False))
    os.environ["NVFLARE_POC_WORKSPACE"] = str(workspace / "poc")
    poc_args = {
        "clients": members,
        "num_clients": len(members),
        "project_conf_path": str(project),
        "username": POC_ADMIN,
    }
    sites = workspace / "sites"
    if scheme == "plaintext":
        env, recipe = PocEnv(**poc_args), build_recipe(config, config_path=config_path, outputs=sites, rounds=rounds)
    elif scheme == "ours":
        client, server = make_contexts(config.privacy.he)
        env = HEPocEnv(**poc_args, server_context=server, client_context=client, privacy_policy=privacy_policy(config))
        recipe = build_recipe(config, config_path=config_path, outputs=sites, rounds=rounds, he=True)
    else:
        env = PocEnv(**poc_args, use_he=True)
        recipe = FedAvgRecipeWithHE(
            name=job_name(config),
            model=server_model(config),
            min_clients=len(members),
            num_rounds=rounds,
            train_script=str(Path(__file__).resolve().parents[1] / "jobs" / "biomarker_mtl" / "client.py"),
            train_args=client_args(config_path=config_path, outputs=sites),
        )
        # the same server-side MLflow receiver as the consortium job, so all three do the same work
        add_experiment_tracking(recipe, "mlflow", {"kw_args": {"experiment_name": config.tracking.experiment}})
    started = time.perf_counter()
    try:
        run = recipe.run(env)
        result = run.get_result(timeout=timeout, clean_up=False)
        status = run.get_status()
    finally:
        env.stop(clean_up=False)
    seconds = time.perf_counter() - started
    return {
        "scheme": scheme,
        "status": status,
        "ok": result is not None,
        "seconds": seconds,
        "rounds": round_seconds(workspace / "poc"),
    }


def print_poc_table(results: list[dict]) -> None:
    print()
    print(f"{'scheme':<10} {'status':<20} {'job s':>7} {'round 0 s':>10} {'steady round s':>15}   per round")
    for r in results:
        steady = [s for k, s in r["rounds"].items() if k > 0]
        per_round = " ".join(f"{s:.1f}" for _, s in sorted(r["rounds"].items()))
        print(
            f"{r['scheme']:<10} {str(r['status'])[:20]:<20} {r['seconds']:7.1f} "
            f"{r['rounds'].get(0, float('nan')):10.1f} "
            f"{float(np.median(steady)) if steady else float('nan'):15.1f}   {per_round}"
        )
    by_name = {r["scheme"]: r for r in results}
    steady = {k: float(np.median([s for i, s in v["rounds"].items() if i > 0] or [np.nan])) for k, v in by_name.items()}
    if {"plaintext", "ours", "stock"} <= set(steady):
        print(
            f"steady round: ours/plaintext {steady['ours'] / steady['plaintext']:4.1f}x   "
            f"stock/plaintext {steady['stock'] / steady['plaintext']:4.1f}x   "
            f"stock/ours {steady['stock'] / steady['ours']:4.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timings are the median over repeats")
    parser.add_argument("--poc", action="store_true", help="also run the three jobs end to end on POC (minutes)")
    parser.add_argument("--poc-rounds", type=int, default=6)
    parser.add_argument("--poc-members", type=int, default=2)
    parser.add_argument("--poc-out", type=Path, default=None, help="where POC runs go; default: a temporary folder")
    parser.add_argument("--poc-scheme", choices=["plaintext", "ours", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--poc-config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poc_scheme:  # one POC job, in its own process (see run_poc_suite)
        logging.basicConfig(level=logging.ERROR)
        result = run_poc(args.poc_scheme, args.poc_config, args.poc_out, rounds=args.poc_rounds)
        print(json.dumps(result, default=str))
        return
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # FLARE components log every step at INFO
    common_decomposers.register()
    base = default_trunk(args.features, args.widths)
    n_params = sum(v.size for v in base.values())
    trunks = member_trunks(base, args.members)
    steps = list(STEPS_PER_MEMBER[: args.members])
    print(
        f"trunk: {args.features} features x {args.widths} = {n_params:,} parameters in {len(base)} arrays; "
        f"{args.members} members, local steps {steps}; timings: median of {args.repeats} runs"
    )
    rows = [
        median_figures([run(trunks, steps) for _ in range(args.repeats)])
        for run in (run_plaintext, run_ours, run_stock)
    ]
    print_table(rows, members=args.members, n_params=n_params)
    if args.poc:
        with tempfile.TemporaryDirectory() as scratch:
            out = (args.poc_out or Path(scratch)).resolve()
            run_poc_suite(out, members=args.poc_members, features=args.features, rounds=args.poc_rounds)


def run_poc_suite(out: Path, *, members: int, features: int, rounds: int) -> None:
    """Each job on a fresh POC, each in a fresh process (FLARE's admin session does not survive this
    process's earlier FOBS work, and a crashed job must not take the others' POC with it)."""
    import jobs
    from consortium.commands.synth import synthesize

    root = str(Path(jobs.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    config_path = synthesize(out / "consortium", sizes=[200] * members, n_features=features, seed=3, rounds=rounds)
    _use_free_ports(config_path)
    print(f"\nPOC: {members} members x {rounds} rounds, synthetic consortium with {features} features, in {out}")
    results = []
    for scheme in ("plaintext", "ours", "stock"):
        done = subprocess.run(
            [sys.executable, __file__, "--poc-scheme", scheme, "--poc-config", str(config_path),
             "--poc-out", str(out), "--poc-rounds", str(rounds)],
            env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"{scheme}: failed (exit {done.returncode}); see {out / scheme}\n{done.stderr[-2000:]}")
            continue
        result = json.loads(lines[-1])
        result["rounds"] = {int(k): v for k, v in result["rounds"].items()}
        results.append(result)
    print_poc_table(results)


def _use_free_ports(config_path: Path) -> None:
    """Other FLARE servers on this machine may hold the default ports: take two free ones."""
    import yaml

    raw = yaml.safe_load(config_path.read_text())
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    raw["operator"].update({"fl_port": ports[0], "admin_port": ports[1]})
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))


if __name__ == "__main__":
    main()
