"""``consortium run`` and ``consortium demo``: a federated run with its report.

Before FLARE starts, every member's data is checked against the contract (as ``consortium data check``
does); an unfit member stops the run with its contract report (exit 1). The run's libraries (NVFlare,
torch, MLflow) are imported inside the commands, so the CLI starts without them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consortium.commands.data import check_member_data, print_report
from consortium.commands.synth import synthesize
from consortium.console import INTERRUPTED_MESSAGE, Console
from schema.errors import UserError

if TYPE_CHECKING:
    from consortium.orchestration import RunResult
    from schema.config import ConsortiumConfig

console = Console()
err_console = Console(stderr=True)


class RunFailed(UserError):
    exit_code = 1


class RunInterrupted(UserError):
    """SIGINT or SIGTERM during a job whose stored rounds were kept: the message says how to continue."""

    exit_code = 130


class DataNotFit(RunFailed):
    """A member's data does not meet the contract: the run does not start."""


class DesignNotEstimable(DataNotFit):
    """The declared design cannot be estimated with member as a factor: the run does not start."""


def check_members(config: ConsortiumConfig, *, as_json: bool = False) -> None:
    """Check every member's data against the contract before FLARE starts; print the unfit members'
    reports (the JSON object of every member's report with ``as_json``) and raise :class:`DataNotFit`."""
    blocks: dict[str, dict] = {m.name: {} for m in config.members}
    reports = {m.name: check_member_data(config, m.name, design_blocks=blocks[m.name]) for m in config.members}
    unfit = [name for name, report in reports.items() if not report.fit]
    if not unfit:
        check_design_rank_across(config, blocks)
        (err_console if as_json else console).print(f"data contract: all {len(reports)} members fit to join")
        return
    if as_json:
        members = {name: report.to_dict() for name, report in reports.items()}
        typer.echo(json.dumps({"started": False, "fit": False, "unfit": unfit, "members": members}, indent=2))
    else:
        for name in unfit:
            print_report(reports[name], name)
    source = config.source or "consortium.yaml"
    raise DataNotFit(
        f"run not started: the data of {', '.join(repr(n) for n in unfit)} does not meet the consortium contract "
        f"(report above); fix the findings, check with 'consortium data check --config {source} --member "
        f"{unfit[0]}', and run again"
    )


def check_design_rank_across(config: ConsortiumConfig, blocks: dict[str, dict]) -> None:
    """Where one party holds every member's data (the demo, a test), refuse a design that is not of full
    rank with member as a factor before anything runs (a covariate level only one member has, a covariate
    confounded with member); each column named."""
    from omics.design import DesignSpec, check_design_rank
    from omics.statistics import design_columns
    from schema import settings

    spec = DesignSpec(**settings.design_spec(config))
    for endpoint, info in config.endpoints().items():
        held = [blocks[m][endpoint][0] for m in info["members"] if endpoint in blocks.get(m, {})]
        if len(held) != len(info["members"]):
            continue  # a member's block is missing: its own data check says why
        columns = design_columns(spec, kind=info["type"])
        aliased = check_design_rank(held, columns=columns)
        if aliased:
            raise DesignNotEstimable(
                f"run not started: endpoint '{endpoint}': the design {spec.formula!r} with member as a factor "
                f"cannot estimate {aliased} (a level seen at one member only, or a covariate confounded with "
                "member); drop or merge those covariate levels in statistics.covariates, or change the formula"
            )


@contextmanager
def console_output_to(log_path: Path, *, terminal_fd: int = 1) -> Iterator[TextIO]:
    """Send this process's and FLARE's child processes' stdout/stderr to ``log_path``.

    FLARE's simulator and POC print job metadata, dots and every log line to the terminal; the user
    should see the progress bar and the summary. Yields a stream to the real terminal (its stdout, or
    its stderr with ``terminal_fd=2``) for them.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0] if terminal_fd == 1 else saved[1]), "w", buffering=1)
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
    as_json: bool = False,
    resume: bool = False,
    force: bool = False,
) -> RunResult:
    """Check the run folder and the data, then run; with ``as_json`` every line for the user goes to stderr
    (stdout stays free for the caller's JSON object). A refused run folder writes nothing."""
    from consortium.flare_env import FederatedRunError, JobInterrupted
    from consortium.orchestration import check_folds, check_run_folder, empty_run_folder, run_consortium
    from consortium.run_state import STATE_FILE
    from schema.config import load_config

    # What the imports made (torch, MLflow, NVFlare: millions of objects) lives as long as the process: kept
    # out of the collector's full passes, the report's plots and model export no longer pay for walking it
    gc.freeze()
    config = load_config(config_path)
    check_folds(config, folds=folds or config.data.folds)  # a usage error writes nothing
    if resume and not (out / STATE_FILE).exists():
        raise UserError(f"{out}: no run to resume here ({STATE_FILE} missing); run the command without --resume")
    folder = dict(env=env, out=out, rounds=rounds, baselines=baselines, he=he, folds=folds, seeds=seeds)
    check_run_folder(config, **folder, resume=resume, force=force)  # before the console log is written
    check_members(config, as_json=as_json)  # before FLARE starts: an unfit member stops the run here
    say = err_console if as_json else console
    if force:  # now, before the console log of this run is opened in it
        empty_run_folder(out, config=config, say=lambda line: say.print(line, markup=False, highlight=False))
    total = rounds or config.training.rounds
    log_path = out / "console.log"
    say.print(f"FLARE's own output goes to {log_path}")
    with console_output_to(log_path, terminal_fd=2 if as_json else 1) as terminal:
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
                    resume=resume,  # --force emptied the folder above, before the console log
                )
            except FederatedRunError as exc:
                raise RunFailed(str(exc)) from None
            except JobInterrupted as exc:
                if not exc.hint:
                    raise
                raise RunInterrupted(f"{INTERRUPTED_MESSAGE}\n{exc.hint}") from None


def result_json(result: RunResult, **extra: Any) -> str:
    """The JSON object ``--json`` prints: where the report is, the job ids, ``extra``, and the report itself
    (as written to report.json, so NaN has become null)."""
    report = json.loads(Path(result.report_path).read_text())
    paths = {"report_path": str(result.report_path), "markdown_path": str(result.markdown_path)}
    return json.dumps({**paths, "job_ids": list(result.job_ids), **extra, "report": report}, indent=2)


def show(result: RunResult, *, as_json: bool) -> None:
    """The run's result for the user: one JSON object with ``as_json``, else the summary."""
    if as_json:
        typer.echo(result_json(result))
    else:
        print_summary(result)


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
        back = (report.get("rejoined") or {}).get(member)
        again = f", answered again from round {back}" if back is not None else ""
        console.print(f"{member} dropped out in round {round_}{again}; the run went on without it", style="yellow")
    for key, parts in (report.get("continued") or {}).items():
        chain = " then ".join(f"{p['job_id']} (rounds {p['rounds'][0]}-{p['rounds'][1]})" for p in parts)
        console.print(f"job {key} was interrupted and continued: {chain}", markup=False, highlight=False)
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
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr."
        ),
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue the run interrupted in --out (same arguments and config) after its last stored round.",
        ),
        force: bool = typer.Option(
            False, "--force", help="Empty --out first when it holds an earlier run (a folder holds one run)."
        ),
    ) -> None:
        """Check every member's data, run the federated biomarker job, write DIR/report.json and DIR/report.md."""
        if env not in ("sim", "poc"):
            raise UserError(f"--env '{env}': use 'sim' (FLARE simulator) or 'poc' (a real server and clients)")
        result = execute(
            config,
            env=env,
            out=out,
            rounds=rounds,
            baselines=baselines,
            he=he,
            folds=folds,
            seeds=seeds,
            as_json=as_json,
            resume=resume,
            force=force,
        )
        show(result, as_json=as_json)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(..., "--out", help="Folder for the synthetic consortium and the run."),
        env: str = typer.Option("poc", "--env", help="'poc' (default) or 'sim'."),
        rounds: int = typer.Option(None, "--rounds", min=1, help="Override the demo's rounds."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: on with POC)."),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the demo run interrupted in --out after its last stored round."
        ),
        force: bool = typer.Option(False, "--force", help="Empty --out/run first when it holds an earlier run."),
    ) -> None:
        """Synthesize the default consortium, run it federated with baselines, and compare."""
        say = err_console if as_json else console
        consortium_dir = out / "consortium"
        config_path = consortium_dir / "consortium.yaml"
        if not config_path.exists():
            with say.status("synthesizing the default consortium (3 members: 300, 800, 2000 samples)..."):
                synthesize(consortium_dir, sizes=[300, 800, 2000], n_features=2000, seed=seed, rounds=10)
        say.print(f"consortium: {config_path}")
        use_he = (env == "poc") if he is None else he
        result = execute(
            config_path,
            env=env,
            out=out / "run",
            rounds=rounds,
            baselines=True,
            he=use_he,
            as_json=as_json,
            resume=resume,
            force=force,
        )
        show(result, as_json=as_json)
