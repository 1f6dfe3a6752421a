"""A run's summary on the console, in report.md, report.json and the CSV tables: losses as well as gains, genes
by their symbols, the features higher and lower with each endpoint apart, at 80 columns without a name cut."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from consortium.comparison import ArmPredictions
from consortium.console import Console
from consortium.report import build_report, write_biomarker_tables, write_report
from consortium.results import JobResults, Released
from consortium.run_summary import render_summary
from models.attribution import ranking_from_vector
from schema.config import load_config
from tests.helpers import binary_statistics

LONG = "tamoxifen_response_at_five_years"  # a shared endpoint with a long name
IDS = [f"ENSG{i:011d}" for i in range(40)]
SYMBOLS = [f"SYM{i}" for i in range(40)]


@pytest.fixture
def config(tmp_path, small_config_dict, small_adata):
    """Two members whose files name Ensembl ids with var['gene_symbols']; both hold LONG (binary), m1 also
    a regression endpoint."""
    small_adata.var_names = IDS
    small_adata.var["gene_symbols"] = SYMBOLS
    small_adata.write_h5ad(tmp_path / "m.h5ad")
    shutil.copy(tmp_path / "m.h5ad", tmp_path / "m2.h5ad")
    raw = dict(small_config_dict, panel={"features": IDS, "id_kind": "ensembl"})
    first = {**raw["members"][0], "tasks": [{"name": LONG, "type": "binary", "column": "response"}]}
    first["tasks"].append({"name": "lvl", "type": "regression", "column": "level"})
    second = {"name": "m2", "org": "Org_Two", "data": "m2.h5ad", "tasks": first["tasks"][:1]}
    raw["members"] = [first, second]
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _arms() -> ArmPredictions:
    """m1's LONG: federated predicts noise, every other arm the label (a loss against each); m2's LONG:
    federated predicts the label, pooled noise (a gain); lvl: all arms alike."""
    rng = np.random.default_rng(0)
    arms = ArmPredictions()
    for member, tasks in (("m1", (LONG, "lvl")), ("m2", (LONG,))):
        targets, preds = {}, {a: {} for a in ("federated", "local", "pooled", "linear_local", "linear_pooled")}
        for task in tasks:
            y = (rng.random(120) < 0.4).astype(float) if task == LONG else rng.normal(size=120)
            good, noise = y + rng.normal(scale=0.3, size=120), rng.normal(size=120)
            targets[task] = y
            for arm in preds:
                if task == "lvl":
                    preds[arm][task] = good
                elif member == "m1":
                    preds[arm][task] = noise if arm == "federated" else good
                else:
                    preds[arm][task] = noise if arm == "pooled" else good
        arms.targets[member] = targets
        for arm, values in preds.items():
            arms.add(arm, member, values)
    return arms


@pytest.fixture
def run(config, tmp_path):
    records = {
        member: [{"round": 0, "total_rounds": 1, "samples": {"train": 50, "val": 10, "test": 20}, "test": {}}]
        for member in ("m1", "m2")
    }
    statistics = binary_statistics(IDS)
    released = Released(
        state={},
        statistics={LONG: statistics.table},
        rankings={LONG: ranking_from_vector(IDS, np.random.default_rng(1).normal(size=40))},
        details={LONG: statistics},
    )
    results = JobResults(folder=tmp_path, records=records, global_model=None)
    report = build_report(
        config,
        [SimpleNamespace(outcome=SimpleNamespace(job_id="job-1"), job_id="job-1", results=results, opened=released)],
        env="sim",
        he=False,
        seconds=12.0,
        arms=_arms(),
        tracking_uri="sqlite:///mlflow.db",
        folds=None,
    )
    out = tmp_path / "run"
    out.mkdir()
    report_path, md_path = write_report(report, out)
    tables = write_biomarker_tables(released, out / "biomarkers", config=config)
    return SimpleNamespace(report=report, report_path=report_path, markdown_path=md_path, tables=tables, out=out)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _console_text(run, *, terminal: bool = False) -> str:
    """The summary at 80 columns, sent to a pipe (lines soft-wrap: one line each) or to a terminal."""
    stream = _Terminal() if terminal else io.StringIO()
    render_summary(
        json.loads(run.report_path.read_text()),
        report_path=run.report_path,
        markdown_path=run.markdown_path,
        to=Console(file=stream, width=80, color_system=None),
    )
    return stream.getvalue()


def test_a_loss_against_pooled_is_said_in_the_console_and_report_md(run):
    text, markdown = _console_text(run), run.markdown_path.read_text()
    diff = run.report["members"]["m1"]["tasks"][LONG]["difference"]["federated-pooled"]
    assert diff["loss"] and diff["ci"][1] < 0
    assert f"loss: m1 {LONG}: federated below pooled, {diff['estimate']:+.3f}" in text
    assert "Losses: federated below another arm beyond the paired interval:" in markdown
    assert f"- m1 {LONG}: federated - pooled {diff['estimate']:+.3f}" in markdown
    gain = run.report["members"]["m2"]["tasks"][LONG]["difference"]["federated-pooled"]
    assert gain["gain"] and f"gain: m2 {LONG}: federated above pooled" in text
    assert "vs pooled: 1 gain, 1 loss of 3" in text
    assert run.report["summary"]["paired"]["federated-pooled"] == {"compared": 3, "gains": 1, "losses": 1}
    assert "| federated - pooled | 3 | 1 | 1 |" in markdown


def test_no_average_across_metrics(run):
    per_member = run.report["summary"]["per_member"]
    assert set(per_member["m1"]) == {"auroc", "r2"} and set(per_member["m2"]) == {"auroc"}
    assert per_member["m1"]["auroc"]["federated"] == run.report["members"]["m1"]["tasks"][LONG]["federated"]


def test_shared_endpoint_figure_is_within_members_with_the_pooled_sample_one_labelled(run):
    endpoint = run.report["endpoints"][LONG]
    each = [run.report["members"][m]["tasks"][LONG]["federated"] for m in ("m1", "m2")]
    assert endpoint["federated"] == pytest.approx(np.mean(each))  # 120 test samples each: equal weights
    assert set(endpoint["pooled_samples"]) >= {"federated", "pooled"}
    assert "pooled_samples" in run.report["definitions"]["endpoint figures"]
    assert f"{LONG} within members (m1, m2): auroc" in _console_text(run)


def test_genes_by_their_symbols_in_the_console_report_md_json_and_csv(run):
    text, markdown = _console_text(run), run.markdown_path.read_text()
    assert "SYM" in text and "SYM" in markdown
    assert "ENSG" not in text and "ENSG" not in markdown  # no id without its symbol
    report = json.loads(run.report_path.read_text())
    bio = report["biomarkers"]
    for rows in (bio["statistics"][LONG], bio["markers"][LONG], bio["markers_down"][LONG], bio["model"][LONG]):
        assert rows and all(r["symbol"] == SYMBOLS[IDS.index(r["feature"])] for r in rows)
        assert list(rows[0])[:2] == ["feature", "symbol"]
    assert all(r["symbol"] == SYMBOLS[IDS.index(r["feature"])] for r in bio["consensus"])
    for path in run.tables:
        table = pd.read_csv(path)
        assert list(table.columns)[:2] == ["feature", "symbol"]
        assert (table["symbol"] == [SYMBOLS[IDS.index(f)] for f in table["feature"]]).all()


def test_features_higher_and_lower_in_the_class_are_listed_apart(run):
    text, markdown = _console_text(run), run.markdown_path.read_text()
    bio = run.report["biomarkers"]
    up = [r["symbol"] for r in bio["markers"][LONG]]
    down = [r["symbol"] for r in bio["markers_down"][LONG]]
    assert up and down
    assert all(r["logFC"] > 0 for r in bio["markers"][LONG]) and all(r["logFC"] < 0 for r in bio["markers_down"][LONG])
    assert [r["t"] for r in bio["markers"][LONG]] == sorted((r["t"] for r in bio["markers"][LONG]), reverse=True)
    assert f"{LONG}: statistics, higher in the positive class: {', '.join(up[:8])}" in text
    assert f"{LONG}: statistics, lower in the positive class: {', '.join(down[:8])}" in text
    assert f"statistics, higher in the positive class (top 10 by statistic): {', '.join(up[:10])}" in markdown
    assert f"statistics, lower in the positive class: {', '.join(down[:10])}" in markdown


def test_summary_fits_80_columns_with_full_names_and_paths_on_one_line(run):
    on_terminal = _console_text(run, terminal=True)
    lines = on_terminal.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in on_terminal
    assert f"m1 {LONG}: auroc on 120 test samples" in lines  # the full endpoint name, not cut
    for arm in ("federated", "local only", "pooled", "linear local", "linear pooled"):
        assert any(line.startswith(f" {arm}  ") for line in lines), arm  # each arm's full name in its table
    piped = _console_text(run).splitlines()
    assert max(len(line) for line in piped if line.startswith((" ", "─"))) <= 80  # tables keep 80 columns
    assert f"report: {run.report_path}" in piped and f"markdown: {run.markdown_path}" in piped
    assert any(
        line.startswith("member endpoints beyond the paired interval, federated vs local only") for line in piped
    )


def test_results_h5ad_ranks_genes_in_scanpys_order(run, config, tmp_path):
    from consortium.anndata_export import write_results_anndata

    statistics = binary_statistics(IDS)
    released = Released(state={}, statistics={LONG: statistics.table}, rankings={}, details={LONG: statistics})
    adata = ad.read_h5ad(write_results_anndata(released, config=config, out=tmp_path / "r.h5ad"))
    record = adata.uns[f"rank_genes_groups_{LONG}"]
    scores = np.asarray(record["scores"][LONG], dtype=float)
    assert list(scores) == sorted(scores, reverse=True)  # by score, the features higher in the class first
    names = list(record["names"][LONG])
    assert names[: len(run.report["biomarkers"]["markers"][LONG])] == [
        r["feature"] for r in run.report["biomarkers"]["markers"][LONG]
    ]
    assert adata.var.loc[names[0], "gene_symbols"] == SYMBOLS[IDS.index(names[0])]
    assert Path(tmp_path / "r.h5ad").exists()


def test_stats_command_prints_symbols_higher_and_lower_apart(config, monkeypatch, tmp_path):
    from consortium.commands import stats as stats_command
    from consortium.statistics_release import statistics_entries

    statistics = binary_statistics(IDS)
    entries = statistics_entries(config, {LONG: statistics}, published={})
    stream = io.StringIO()
    monkeypatch.setattr(stats_command, "console", Console(file=stream, width=80, color_system=None))
    stats_command.print_statistics(SimpleNamespace(statistics={"endpoints": entries}, path=tmp_path, tables=[]))
    lines = stream.getvalue().splitlines()
    up, down = lines.index("  higher in the positive class:"), lines.index("  lower in the positive class:")
    assert up < down
    assert lines[up + 1].split()[0] == entries[LONG]["markers"][0]["symbol"]
    assert lines[down + 1].split()[0] == entries[LONG]["markers_down"][0]["symbol"]
    assert "ENSG" not in stream.getvalue()


def test_summary_names_the_flare_job_and_a_tracking_servers_address(run):
    printed = _console_text(run)
    report = json.loads(run.report_path.read_text())
    assert f"FLARE job: {report['job_ids'][0]}" in printed or f"FLARE jobs: {', '.join(report['job_ids'])}" in printed
    assert "mlflow ui --backend-store-uri" in printed  # a file store: the command that opens it
    served = dict(report, tracking={**report["tracking"], "uri": "http://tracking.example:5000"})
    stream = io.StringIO()
    render_summary(
        served, report_path=run.report_path, markdown_path=run.markdown_path, to=Console(file=stream, width=80)
    )
    assert "MLflow: http://tracking.example:5000" in stream.getvalue() and "mlflow ui" not in stream.getvalue()


def test_report_states_secure_aggregation_off_with_two_members(run):
    state = json.loads(run.report_path.read_text())["privacy"]["secure_aggregation"]
    assert state["enabled"] is False and state["quantization"] is None
    assert state["why_off"].startswith("fewer than 3 members per round: a round may close with 2")
    assert "the aggregate minus a member's own update is the other member's update" in state["aggregate_reveals"]
    markdown = run.markdown_path.read_text()
    assert "- secure aggregation: off, fewer than 3 members per round: a round may close\n" in markdown
    assert "- what the aggregate itself reveals: with two members in a round, the aggregate\n" in markdown
