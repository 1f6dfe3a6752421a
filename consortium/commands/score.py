"""``consortium score``: a member scores new samples at its own site with the released model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from consortium.console import Console
from schema.errors import UserError

console = Console()
SHOWN_ROWS = 20


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score(
        data: Path = typer.Argument(..., help="An .h5ad of new samples, in the member's own layout (consortium.yaml)."),
        config: Path = typer.Option(..., "--config", help="The consortium.yaml."),
        member: str = typer.Option(..., "--member", help="The member scoring (its layout, scaling, validation split)."),
        run: Path = typer.Option(
            None, "--run", help="The run's folder: its sites/<member>/scaling.json and its MLflow store."
        ),
        scaling: Path = typer.Option(
            None, "--scaling", help="The member's scaling.json (default: <run>/sites/<member>/scaling.json)."
        ),
        model: str = typer.Option(
            None, "--model", help="models:/<name>/<version> (default: the run's, else the latest registered version)."
        ),
        tracking_uri: str = typer.Option(
            None, "--tracking-uri", help="MLflow tracking URI (default: the run's, else tracking.uri)."
        ),
        level: float = typer.Option(0.9, "--level", min=0.5, max=0.999, help="Conformal coverage of the intervals."),
        alert: list[str] = typer.Option(
            [], "--alert", metavar="ENDPOINT>VALUE", help="Flag samples beyond a threshold (repeatable; or <, >=, <=)."
        ),
        out: Path = typer.Option(None, "--out", help="Write every sample's scores to this CSV."),
        as_json: bool = typer.Option(False, "--json", help="Print the scores as one JSON object."),
    ) -> None:
        """Score new samples with the released model: per shared endpoint the prediction in real units, a
        conformal interval (regression) or set (binary) calibrated on this member's validation split, alerts."""
        from consortium.scoring import default_scaling, latest_model, released_fold, run_model, score_file
        from consortium.shared_model import tracking_uri_for
        from omics.errors import OmicsError
        from schema.config import load_config

        consortium = load_config(config)
        if not data.is_file():
            raise UserError(f"{data}: no such file; give the .h5ad of the samples to score")
        if scaling is None and run is None:
            raise UserError("give --run RUN_FOLDER (the run that trained the model) or --scaling SCALING_JSON")
        consortium.member(member)  # a ConfigError naming the members otherwise
        fold = released_fold(run) if run is not None else None  # a run with --folds released its last fold
        scaling_path = scaling or default_scaling(run, member, fold=fold)
        # the run's store, else the consortium's tracking server (tracking.uri) holding its registry
        uri = tracking_uri or (tracking_uri_for(consortium, out=run) if run is not None else consortium.tracking.uri)
        if uri is None and (model is None or not model.startswith(("runs:/", "file:", "/"))):
            raise UserError(
                "give --run RUN_FOLDER or --tracking-uri URI (or set tracking.uri in consortium.yaml): where the "
                "registered model is"
            )
        try:
            model_uri = (
                model or (run_model(run) if run is not None else None) or latest_model(consortium, tracking_uri=uri)
            )
            if uri:
                import mlflow

                mlflow.set_tracking_uri(uri)
            scores = score_file(
                consortium,
                member,
                data=data,
                scaling=scaling_path,
                model_uri=model_uri,
                level=level,
                alerts=alert,
                fold=fold,
            )
        except (OmicsError, ValueError) as exc:
            raise UserError(f"consortium score: {exc}") from None
        if out is not None:
            scores.table.to_csv(out, index_label="sample")
        if as_json:
            typer.echo(json.dumps(scores_json(scores), default=str))
            return
        print_scores(scores, console=console, out=out)


def scores_json(scores) -> dict:
    return {
        "model": scores.model_uri,
        "scaling": str(scores.scaling),
        "level": scores.level,
        "endpoints": scores.endpoints,
        "calibration_samples": scores.calibration,
        "test_coverage": scores.coverage,
        "samples": json.loads(scores.table.to_json(orient="index")),
    }


def print_scores(scores, *, console: Console, out: Path | None = None, title: str | None = None) -> None:
    """The scores as one small table per endpoint (the first rows: sample ids and endpoint names whole at 80
    columns), the alerts and the conformal coverage."""
    shown = scores.table.head(SHOWN_ROWS)
    n = len(scores.table)
    console.print(title or f"scores ({n} sample{'' if n == 1 else 's'}, model {scores.model_uri})")
    for name in scores.endpoints:
        headers = {name: "prediction", f"{name}_low": "low", f"{name}_high": "high", f"{name}_set": "set"}
        alerts = [a for a in scores.alerts if a.endpoint == name]
        headers.update({f"alert {a}": f"alert {str(a).removeprefix(name)}" for a in alerts})
        columns = [c for c in headers if c in shown.columns]
        if not columns:
            continue
        table = Table(title=name, title_justify="left")
        table.add_column("sample", no_wrap=True)
        for column in columns:
            table.add_column(headers[column], justify="right")
        for sample, row in shown[columns].iterrows():
            table.add_row(str(sample), *(_cell(v) for v in row))
        console.print(table)
    if len(scores.table) > SHOWN_ROWS:
        console.print(f"... {len(scores.table) - SHOWN_ROWS} more samples" + (f" in {out}" if out else ""))
    kinds = ", ".join(f"{k}: {_unit(v)}" for k, v in scores.endpoints.items())
    console.print(f"endpoints: {kinds}")
    for alert in scores.alerts:
        flagged = scores.table[f"alert {alert}"]
        console.print(f"alert {alert}: {int(flagged.sum())} of {len(flagged)} samples")
    for name, figures in scores.coverage.items():
        what = "prediction set" if scores.endpoints[name] == "binary" else "interval"
        console.print(
            f"{name}: {scores.level:.0%} conformal {what}, calibrated on {scores.calibration[name]} validation "
            f"samples; coverage on this member's test split {figures['coverage']:.3f} (n = {figures['n']})"
        )
    if out is not None:
        console.print(f"scores written to {out}")


def _unit(kind: str) -> str:
    return {"binary": "probability", "regression": "target units", "survival": "risk score"}.get(kind, kind)


def _cell(value) -> str:
    if isinstance(value, float):  # numpy's float64 too
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


DEMO_SHARED = ("marker", "pfs")  # the demo's endpoints every member holds: a regression and a survival one
DEMO_ALERT = "marker>1.5"


def score_demo(config_path: Path, run: Path, *, console: Console) -> None:
    """The demo's last step: the first member scores its held-out (test) samples with the registered model,
    as ``consortium score`` would, and each member's conformal coverage on its test split is shown."""
    import mlflow

    from consortium.scoring import (
        conformal_coverage,
        default_scaling,
        held_out_samples,
        latest_model,
        run_model,
        score_file,
    )
    from consortium.shared_model import tracking_uri_for
    from schema.config import load_config

    config = load_config(config_path)
    if not config.shared_endpoints():
        console.print("no shared endpoint in this consortium: no registered model to score with")
        return
    member = config.members[0].name
    uri = tracking_uri_for(config, out=run)
    mlflow.set_tracking_uri(uri)  # where models:/ URIs resolve
    model_uri = run_model(run) or latest_model(config, tracking_uri=uri)
    samples = held_out_samples(config, member, out=run / "scoring" / f"{member}-held-out.h5ad")
    alerts = [DEMO_ALERT] if "marker" in config.shared_endpoints() else []
    scores = score_file(
        config, member, data=samples, scaling=default_scaling(run, member), model_uri=model_uri, alerts=alerts
    )
    out = run / "scoring" / f"{member}-scores.csv"
    scores.table.to_csv(out, index_label="sample")
    console.print(f"registered model: {model_uri} (MLflow tracking store {uri})")
    console.print(
        f"{member} scores its {len(scores.table)} held-out samples, as it would new ones:\n"
        f"  consortium score {samples} --config {config_path} --member {member} --run {run}"
        + "".join(f" --alert '{a}'" for a in alerts)
    )
    print_scores(scores, console=console, out=out, title=f"{member}: held-out samples scored with {model_uri}")
    for other in config.members[1:]:
        coverage = conformal_coverage(config, other.name, model_uri=model_uri, scaling=default_scaling(run, other.name))
        for name, figures in coverage.items():
            console.print(
                f"{other.name} {name}: {scores.level:.0%} conformal coverage on its test split "
                f"{figures['coverage']:.3f} (n = {figures['n']})"
            )
