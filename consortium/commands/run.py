"""``consortium run`` and ``consortium demo``: a federated run with its report."""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consortium.commands.synth import synthesize
from consortium.flare_env import FederatedRunError
from consortium.orchestration import RunResult, check_folds, run_consortium
from schema.config import load_config
from schema.errors import UserError

console = Console()


class RunFailed(UserError):
    exit_code = 1


@contextmanager
def _console_output_to(log_path: Path) -> Iterator[TextIO]:
    """Send this process's and FLARE's child processes' stdout/stderr to ``log_path``.

    FLARE's simulator and POC print job metadata, dots and every log line to the terminal; the user
    should see the progress bar and the summary. Yields a stream to the real terminal for them.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


def _progress_bar(total: int, *, stream: TextIO) -> tuple[Progress, Any]:
    bar = Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metric]}"),
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=False,
    )
    task = bar.add_task("rounds", total=total, metric="starting FLARE...")
    lock = threading.Lock()

    def update(done: int, total_: int, info: dict[str, Any]) -> None:
        values = [record.get("train_loss") for record in info.get("sites", {}).values() if record is not None]
        finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        text = f"mean train loss {sum(finite) / len(finite):.3f}" if finite else ""
        with lock:
            bar.update(task, completed=done, metric=text)

    return bar, update


def execute(
    config_path: Path,
    *,
    env: str,
    out: Path,
    rounds: int | None,
    baselines: bool,
    he: bool | None,
    folds: int | None = None,
    seeds: int = 1,
) -> RunResult:
    config = load_config(config_path)
    check_folds(config, folds=folds or config.data.folds)  # a usage error writes nothing
    total = rounds or config.training.rounds
    log_path = out / "console.log"
    console.print(f"FLARE's own output goes to {log_path}")
    with _console_output_to(log_path) as terminal:
        bar, update = _progress_bar(total, stream=terminal)
        with bar:
            try:
                return run_consortium(
                    config,
                    env=env,
                    out=out,
                    rounds=rounds,
                    baselines=baselines,
                    he=he,
                    folds=folds,
                    seeds=seeds,
                    progress=update,
                    status=lambda line: bar.console.print(line, markup=False, style="dim"),
                )
            except FederatedRunError as exc:
                raise RunFailed(str(exc)) from None


def print_summary(result: RunResult) -> None:
    report = result.report
    arms = [a for a in ("federated", "local", "pooled", "linear_pooled") if a == "federated" or report.get("summary")]
    table = Table(title="test metric per member and endpoint, 95% bootstrap interval")
    for column in ("member", "endpoint", "metric", *arms):
        table.add_column(column, justify="right" if column in arms else "left")
    for member, info in report["members"].items():
        for task, entry in info["tasks"].items():
            ci = entry.get("ci") or {}
            table.add_row(member, task, entry["metric"], *[_with_ci(entry.get(a), ci.get(a)) for a in arms])
    console.print(table)
    for member, info in report["members"].items():
        for task, entry in info["tasks"].items():
            for key, diff in (entry.get("difference") or {}).items():
                if key in ("federated-local", "federated-pooled"):
                    verdict = "gains" if diff["gain"] else "no gain shown"
                    console.print(
                        f"{member} {task}: {key} {_with_ci(diff['estimate'], diff['ci'])}: {verdict}",
                        markup=False,
                        highlight=False,
                    )
    for member, round_ in (report.get("dropped") or {}).items():
        console.print(f"{member} dropped out in round {round_}; the run went on without it", style="yellow")
    bio = report["biomarkers"]
    for name in report["endpoints"]:
        stats = ", ".join(r["feature"] for r in bio["statistics"].get(name, [])[:8])
        model = ", ".join(r["feature"] for r in bio["model"].get(name, [])[:8])
        console.print(f"{name}: statistics {stats}; model {model}", markup=False, highlight=False)
    planted = bio.get("consensus_planted_in_top")
    if planted:
        console.print(f"{planted['planted']} of the top {planted['k']} consensus biomarkers were planted")
    timing = report["timing"]
    console.print(
        f"{timing['rounds']} rounds in {timing['seconds_total']:.0f} s, "
        f"{timing['bytes_received_per_round']:,} bytes received per round; HE "
        f"{'on' if report['privacy']['he'] else 'off'}"
    )
    console.print(
        f"report: {result.report_path}\nmarkdown: {result.markdown_path}\n"
        f"MLflow: mlflow ui --backend-store-uri {report['tracking']['uri']}",
        markup=False,
        highlight=False,
    )


def _with_ci(value: Any, ci: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if not ci or ci[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        env: str = typer.Option("sim", "--env", help="'sim' (FLARE simulator) or 'poc' (real FLARE processes)."),
        out: Path = typer.Option(..., "--out", help="Run folder: report.json, report.md, MLflow store, logs."),
        rounds: int = typer.Option(None, "--rounds", min=1, help="Override training.rounds."),
        baselines: bool = typer.Option(False, "--baselines", help="Also train local-only and pooled baselines."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: privacy.he.enabled)."),
        folds: int = typer.Option(
            None, "--folds", min=2, max=20, help="K-fold cross-validation: K jobs, every sample tested once."
        ),
        seeds: int = typer.Option(
            1,
            "--seeds",
            min=1,
            max=20,
            help="Repeat the comparison with N seeds; mean and sd of the paired differences.",
        ),
    ) -> None:
        """Run the federated biomarker job and write DIR/report.json and DIR/report.md."""
        if env not in ("sim", "poc"):
            raise UserError(f"--env '{env}': use 'sim' (FLARE simulator) or 'poc' (a real server and clients)")
        print_summary(
            execute(config, env=env, out=out, rounds=rounds, baselines=baselines, he=he, folds=folds, seeds=seeds)
        )

    @app.command("demo")
    def demo(
        out: Path = typer.Option(..., "--out", help="Folder for the synthetic consortium and the run."),
        env: str = typer.Option("poc", "--env", help="'poc' (default) or 'sim'."),
        rounds: int = typer.Option(None, "--rounds", min=1, help="Override the demo's rounds."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: on with POC)."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Synthesize the default consortium, run it federated with baselines, and compare."""
        consortium_dir = out / "consortium"
        config_path = consortium_dir / "consortium.yaml"
        if not config_path.exists():
            with console.status("synthesizing the default consortium (3 members: 300, 800, 2000 samples)..."):
                synthesize(consortium_dir, sizes=[300, 800, 2000], n_features=2000, seed=seed, rounds=10)
        console.print(f"consortium: {config_path}")
        use_he = (env == "poc") if he is None else he
        print_summary(execute(config_path, env=env, out=out / "run", rounds=rounds, baselines=True, he=use_he))
