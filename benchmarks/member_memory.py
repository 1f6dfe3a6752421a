"""A member's memory: where its process's peak resident memory comes from, at 2,000 and 20,000 features.

    python benchmarks/member_memory.py --features 2000 [--samples 2000] [--rounds 3] [--out DIR]
    python benchmarks/member_memory.py --features 20000 --sim      # also a 2-member simulator run

It writes a synthetic consortium of two members (``--samples`` and ``--small`` samples, as the 16 x 20k
scaling case's largest and smallest member) over ``--features`` features, then runs the larger member's job
code in a fresh process, as FLARE's in-process Client API runs ``jobs/client.py``: the client script's
imports, then :class:`jobs.site.MemberSite` served ``--rounds`` rounds by a stand-in for ``nvflare.client``
that hands each round the update the member sent the round before. Each step of the job (the imports, the
data's load, each round and, in the last round, the test figures, the statistics, the scaling pieces and
each endpoint's attribution) runs with the kernel's peak-RSS mark reset before it (``/proc/self/clear_refs``),
so the step's own peak (``VmHWM``) is printed beside the RSS it started from; the process's peak is the
largest of them (the reset clears ``ru_maxrss`` too). The process sets glibc's mmap threshold as
``jobs/client.py`` does (:mod:`jobs.process_memory`). Figures: ``docs/benchmarks.md``.

With ``--sim`` it also runs ``consortium run --env sim --no-he --rounds R`` on the same consortium and
prints each member's ``peak_rss_mb`` from its published record (the FLARE process's ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "consortium.cli"]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) of this process to its RSS now (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class Steps:
    """Each step's own peak RSS; a nested step ends its parent's segment and starts a fresh one after it."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._stack: list[dict] = []

    def _close_segment(self) -> None:
        if self._stack:
            row = self._stack[-1]
            row["peak_mb"] = max(row["peak_mb"], _status_mb("VmHWM"))
        _reset_peak()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._close_segment()
        depth = len(self._stack)
        row = {"step": name, "depth": depth, "start_mb": _status_mb("VmRSS"), "peak_mb": 0.0, "seconds": 0.0}
        self.rows.append(row)
        self._stack.append(row)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._close_segment()
            row["seconds"] = time.perf_counter() - started
            row["end_mb"] = _status_mb("VmRSS")
            self._stack.pop()
            for parent in self._stack:
                parent["peak_mb"] = max(parent["peak_mb"], row["peak_mb"])

    def wrap(self, owner: object, attribute: str, label) -> None:
        """Run ``owner.attribute`` (a function or method) as a step each time it is called; ``label`` is the
        step's name, or a function of the call's arguments that gives it."""
        original = getattr(owner, attribute)
        steps = self

        def wrapped(*args, **kwargs):
            with steps.step(label if isinstance(label, str) else label(*args, **kwargs)):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)


class EchoFlare:
    """Stands in for ``nvflare.client`` with one member: round 0 brings the member's own initial shared state,
    round r the trunk and shared heads it sent in round r - 1 (what a sum over one member is)."""

    def __init__(self, initial: dict, *, rounds: int) -> None:
        self.initial, self.rounds = initial, rounds
        self.sent: list = []
        self.received = 0

    def is_running(self) -> bool:
        return self.received < self.rounds

    def receive(self, timeout=None):
        from nvflare.app_common.abstract.fl_model import FLModel

        from jobs.sections import sections_of

        if self.received >= self.rounds:
            return None
        current, self.received = self.received, self.received + 1
        if current == 0:
            return FLModel(params=dict(self.initial), current_round=0, total_rounds=self.rounds)
        last = self.sent[-1]
        params = {k: v.numpy() for k, v in last.params.items() if k.startswith(("trunk.", "heads."))}
        sections = {n: s.to_meta() for n, s in sections_of(last.meta).items() if n.startswith(("trunk", "head:"))}
        meta = {"consortium_sections": sections}
        return FLModel(params=params, meta=meta, current_round=current, total_rounds=self.rounds)

    def send(self, model, clear_cache: bool = True) -> None:
        self.sent = [model]  # only the last update is read back: hold no more than FLARE would


def member_job(config_path: Path, member: str, *, rounds: int, outputs: Path) -> dict:
    """One member's job code in this process, step by step (see the module's docstring)."""
    steps = Steps()
    with steps.step("imports (jobs.client)"):
        import jobs.client  # the client script's imports, as FLARE loads it
    from jobs.process_memory import return_freed_arrays

    return_freed_arrays()  # as jobs.client.main does
    import jobs.member_data
    import jobs.site
    from jobs.site_outputs import SiteOutputs
    from jobs.site_statistics import SiteStatistics
    from models.network import MultitaskNet
    from models.training import LocalTrainer
    from schema.config import load_config

    site_class = jobs.site.MemberSite
    for owner, attribute, name in [
        (jobs.member_data, "load_member", "load the member's data"),
        (site_class, "train_round", lambda site, received: f"round {received.current_round}"),
        (LocalTrainer, "train", "train"),
        (LocalTrainer, "evaluate", "evaluate"),
        (site_class, "finish", "finish (last round)"),
        (MultitaskNet, "predict", "predict"),
        (site_class, "association_sections", "statistics"),
        (site_class, "scaling_sections", "scaling pieces"),
        (SiteStatistics, "every_round_sections", "statistics (every round)"),
        (jobs.site, "rank_features", lambda model, X, task, **_: f"attribution {task}"),
        (SiteOutputs, "save_checkpoint", "save checkpoint"),
        (SiteOutputs, "save_model", "save model"),
    ]:
        steps.wrap(owner, attribute, name)
    config = load_config(config_path)
    with steps.step("site: load, build the network"):
        site = site_class(config, member, outputs=SiteOutputs(outputs / member))
    fake = EchoFlare(jobs.site.outgoing_state(site.model), rounds=rounds)
    jobs.site.serve(site, fake)
    return {
        "member": member,
        "samples": len(site.data.X),
        "features": site.data.n_features,
        "rounds": rounds,
        # each step resets the kernel's mark, which ru_maxrss reads too: the process's peak is the steps' largest
        "peak_mb": max(
            [row["peak_mb"] for row in steps.rows] + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
        ),
        "steps": steps.rows,
    }


def print_steps(figures: dict) -> None:
    print(
        f"\nmember {figures['member']}: {figures['samples']} samples x {figures['features']} features, "
        f"{figures['rounds']} rounds (one process, no FLARE runtime)"
    )
    print(f"  {'step':44s} {'RSS before':>10s} {'own peak':>9s} {'RSS after':>10s} {'seconds':>8s}")
    for row in figures["steps"]:
        name = "  " * row["depth"] + row["step"]
        print(
            f"  {name:44s} {row['start_mb']:8.0f} MB {row['peak_mb']:6.0f} MB {row['end_mb']:8.0f} MB "
            f"{row['seconds']:8.1f}"
        )
    print(f"  the process's peak RSS: {figures['peak_mb']:.0f} MB", flush=True)


def simulator_peaks(config_path: Path, *, rounds: int, out: Path) -> dict[str, float]:
    """``consortium run --env sim --no-he``; each member's peak RSS from its published records."""
    from consortium.results import read_records

    command = [*CLI, "run", "--config", str(config_path), "--env", "sim", "--no-he", "--rounds", str(rounds)]
    started = time.perf_counter()
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"consortium run failed ({done.returncode}): {done.stderr[-3000:]}")
    print(f"\nsimulator run, {rounds} rounds: {time.perf_counter() - started:.0f} s")
    peaks = {
        site: max(float(r.get("peak_rss_mb") or 0) for r in records) for site, records in read_records(out).items()
    }
    for site, peak in sorted(peaks.items()):
        print(f"  member {site}: peak RSS {peak:.0f} MB (ru_maxrss in published.jsonl)", flush=True)
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000, help="the larger member's samples (its job is run)")
    parser.add_argument("--small", type=int, default=300, help="the other member's samples")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim", action="store_true", help="also a 2-member simulator run")
    parser.add_argument("--out", type=Path, default=None, help="folder to keep (default: a temporary one)")
    parser.add_argument("--member-job", nargs=2, metavar=("CONFIG", "MEMBER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.member_job:
        config, member = args.member_job
        outputs = Path(tempfile.mkdtemp(prefix="member-memory-"))
        print(json.dumps(member_job(Path(config), member, rounds=args.rounds, outputs=outputs)))
        return 0
    from consortium.commands.synth import synthesize
    from schema.config import load_config

    folder = (args.out or Path(tempfile.mkdtemp(prefix="member-memory-"))).resolve()
    consortium = folder / f"synth-{args.samples}+{args.small}x{args.features}"
    config_path = consortium / "consortium.yaml"
    if not config_path.exists():
        synthesize(consortium, sizes=[args.samples, args.small], n_features=args.features, seed=args.seed)
    member = load_config(config_path).members[0].name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--member-job", str(config_path), member, "--rounds", str(args.rounds)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the member's job failed ({done.returncode}): {done.stderr[-3000:]}")
    print_steps(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.sim:
        simulator_peaks(config_path, rounds=args.rounds, out=folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
