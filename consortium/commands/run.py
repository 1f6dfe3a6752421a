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

from consortium.commands.data import check_member_data, expected_test_cases, folds_hint, print_report
from consortium.commands.init import set_operator_ports
from consortium.commands.score import DEMO_SHARED, score_demo
from consortium.commands.synth import synthesize
from consortium.console import INTERRUPTED_MESSAGE, Console
from consortium.run_options import RunOptions
from consortium.run_summary import print_summary
from schema.errors import UserError

if TYPE_CHECKING:
    from consortium.run_results import RunResult
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


def check_members(config: ConsortiumConfig, *, as_json: bool = False, folds: int | None = None) -> None:
    """Check every member's data against the contract before FLARE starts; print the unfit members'
    reports (the JSON object of every member's report with ``as_json``) and raise :class:`DataNotFit`.
    Without folds, a member whose test split would be small gets a hint to cross-validate."""
    blocks: dict[str, dict] = {m.name: {} for m in config.members}
    reports = {m.name: check_member_data(config, m.name, design_blocks=blocks[m.name]) for m in config.members}
    unfit = [name for name, report in reports.items() if not report.fit]
    if not unfit:
        check_design_rank_across(config, blocks)
        say = err_console if as_json else console
        say.print(f"data contract: all {len(reports)} members fit to join")
        if not (folds or config.data.folds):
            for name, report in reports.items():
                hint = folds_hint(expected_test_cases(report, config.data.test_fraction), member=name)
                if hint:
                    say.print(hint, markup=False, highlight=False)
        return
    if as_json:
        members = {name: report.to_dict() for name, report in reports.items()}
        typer.echo(json.dumps({"started": False, "fit": False, "unfit": unfit, "members": members}, indent=2))
    else:
        for name in unfit:
            print_report(reports[name], name, omics=bool(config.panel_features()))
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


def execute(config_path: Path, options: RunOptions, *, as_json: bool = False) -> RunResult:
    """Plan the run (nothing is written before the plan holds), check the data, then run; with ``as_json``
    every line for the user goes to stderr (stdout stays free for the caller's JSON object)."""
    from consortium.flare_env import FederatedRunError, JobInterrupted
    from consortium.orchestration import run_consortium
    from consortium.run_folder import empty_run_folder
    from consortium.run_plan import RunPlan, check_fold_labels
    from schema.config import load_config

    # What the imports made (torch, MLflow, NVFlare: millions of objects) lives as long as the process: kept
    # out of the collector's full passes, the report's plots and model export no longer pay for walking it
    gc.freeze()
    options.check()
    plan = RunPlan.build(load_config(config_path), options)  # refused as a whole, before anything is written
    check_fold_labels(plan)  # the data checks: before FLARE starts, an unfit member stops the run here
    if plan.data_here:  # on kits each member checks its own data at its site ('consortium data check')
        check_members(plan.config, as_json=as_json, folds=plan.folds)
    say = err_console if as_json else console
    if plan.force:  # now, before the console log of this run is opened in it
        empty_run_folder(
            plan.out, inputs=plan.inputs(), say=lambda line: say.print(line, markup=False, highlight=False)
        )
    log_path = plan.out / "console.log"
    say.print(f"FLARE's own output goes to {log_path}")
    with console_output_to(log_path, terminal_fd=2 if as_json else 1) as terminal:
        bar, update = _progress_bar(plan.rounds, stream=terminal)
        with bar:
            try:
                return run_consortium(
                    plan, progress=update, status=lambda line: bar.console.print(line, markup=False, style="dim")
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


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        env: str = typer.Option(
            "sim",
            "--env",
            help="'sim' (FLARE simulator), 'poc' (real FLARE processes here) or 'kits' (a running provisioned "
            "consortium, with --startup-kit).",
        ),
        out: Path = typer.Option(..., "--out", help="Run folder: report.json, report.md, MLflow store, logs."),
        rounds: int = typer.Option(None, "--rounds", help="Override training.rounds."),
        baselines: bool = typer.Option(False, "--baselines", help="Also train local-only and pooled baselines."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: privacy.he.enabled)."),
        folds: int = typer.Option(
            None, "--folds", help="K-fold cross-validation (2 to 20): K jobs, every sample tested once."
        ),
        seeds: int = typer.Option(
            1,
            "--seeds",
            help="Repeat the comparison with N seeds (1 to 20); mean and sd of the paired differences.",
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
        startup_kit: Path = typer.Option(
            None,
            "--startup-kit",
            help="--env kits: a member lead's admin startup kit (KITS/<lead>), with its member's kit beside it.",
        ),
        username: str = typer.Option(
            None, "--username", help="--env kits: the admin user to log in as (default: the kit folder's name)."
        ),
    ) -> None:
        """Check every member's data, run the federated biomarker job, write DIR/report.json and DIR/report.md."""
        options = RunOptions(
            out=out,
            env=env,
            rounds=rounds,
            baselines=baselines,
            he=he,
            folds=folds,
            seeds=seeds,
            resume=resume,
            force=force,
            startup_kit=startup_kit,
            username=username,
        )
        show(execute(config, options, as_json=as_json), as_json=as_json)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(..., "--out", help="Folder for the synthetic consortium and the run."),
        env: str = typer.Option("poc", "--env", help="'poc' (default) or 'sim'."),
        rounds: int = typer.Option(None, "--rounds", help="Override the demo's rounds."),
        he: bool = typer.Option(None, "--he/--no-he", help="Encrypted aggregation (default: on with POC)."),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the demo run interrupted in --out after its last stored round."
        ),
        force: bool = typer.Option(False, "--force", help="Empty --out/run first when it holds an earlier run."),
        ports: str = typer.Option(
            None, "--ports", help="The demo server's FL and admin ports, e.g. 9102,9103 (default 8102,8103)."
        ),
    ) -> None:
        """Synthesize the default consortium, run it federated with baselines, and compare."""
        use_he = (env == "poc") if he is None else he
        options = RunOptions(
            out=out / "run", env=env, rounds=rounds, baselines=True, he=use_he, resume=resume, force=force
        )
        options.check()  # a usage error synthesizes and writes nothing
        say = err_console if as_json else console
        consortium_dir = out / "consortium"
        config_path = consortium_dir / "consortium.yaml"
        if not config_path.exists():
            with say.status("synthesizing the default consortium (3 members: 300, 800, 2000 samples)..."):
                synthesize(
                    consortium_dir, sizes=[300, 800, 2000], n_features=2000, seed=seed, rounds=10, shared=DEMO_SHARED
                )
        set_operator_ports(config_path, ports)
        say.print(f"consortium: {config_path}")
        result = execute(config_path, options, as_json=as_json)
        show(result, as_json=as_json)
        score_demo(config_path, out / "run", console=say)  # a member scores held-out samples with the model
