"""``consortium score``: a member scores new samples at its site, in its own layout, with the released model.

A sample's answer is its own: scored alone, with one other or with 199 others, by ``consortium score``,
by the registered pyfunc model and by ``mlflow models serve`` over REST, it is the same to 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from consortium.cli import main as cli
from consortium.commands.synth import synthesize
from omics.io import read_member, write_member
from schema.config import load_config
from tests.helpers import free_ports, release_random_model, wait_until

MEMBER = "pharma-b"  # the member that lacks a few panel features


def _ensembl(i: int) -> str:
    return f"ENSG{i:011d}"


def _member_layout_file(adata: ad.AnnData, ids: list[str]) -> ad.AnnData:
    """``adata`` as a member keeps it: symbols as var_names, Ensembl ids in var['gene_ids'], counts in a
    layer and log values in X (so reading X instead of the layer would give other answers)."""
    counts = np.asarray(adata.X, dtype=np.float32)
    out = ad.AnnData(
        X=np.log1p(counts), obs=adata.obs.copy(), var=pd.DataFrame({"gene_ids": ids}, index=list(adata.var_names))
    )
    out.layers["counts"] = counts
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A consortium on an Ensembl panel; pharma-b keeps counts in layers['counts'] and ids in var['gene_ids']."""
    folder = tmp_path_factory.mktemp("score")
    cfg = synthesize(folder / "c", sizes=[120, 150], n_features=120, seed=4, rounds=1)
    raw = yaml.safe_load(cfg.read_text())
    panel_file = folder / "c" / "panel.txt"
    symbols = panel_file.read_text().split()
    to_id = {s: _ensembl(i + 1) for i, s in enumerate(symbols)}
    panel_file.write_text("\n".join(to_id.values()) + "\n")
    raw["panel"]["id_kind"] = "ensembl"
    paths = {m.name: m.data for m in load_config(cfg).members}
    for member in raw["members"]:
        adata = read_member(paths[member["name"]])
        ids = [to_id[s] for s in adata.var_names]
        if member["name"] == MEMBER:
            write_member(_member_layout_file(adata, ids), paths[member["name"]])
            member |= {"layer": "counts", "var_id_column": "gene_ids"}
        else:
            adata.var_names = ids
            write_member(adata, paths[member["name"]])
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    made = release_random_model(
        cfg, folder / "run", shared={"survival": "pfs", "regression": "marker", "binary": "response"}
    )
    made["folder"], made["to_id"] = folder, to_id
    return made


@pytest.fixture(scope="module")
def batches(released):
    """Files of new samples in the member's layout with versioned ids: the sample of interest alone, with
    one other, and with 199 others (the member's samples, resampled)."""
    config, folder = released["config"], released["folder"]
    own = read_member(config.member(MEMBER).data)  # in the member's layout: counts in a layer, ids in var
    rng = np.random.default_rng(0)
    counts = np.asarray(own.layers["counts"], dtype=np.float32)
    rows = rng.integers(0, own.n_obs, size=199)
    crowd = rng.poisson(counts[rows] * rng.uniform(0.5, 2.0, size=(199, 1))).astype(np.float32)
    versioned = [f"{i}.{7 + k % 5}" for k, i in enumerate(own.var["gene_ids"])]
    files = {}
    for size in (1, 2, 200):
        X = np.vstack([counts[:1], crowd[: size - 1]])
        obs = pd.DataFrame(index=["patient-1", *[f"other-{i}" for i in range(size - 1)]])
        adata = _member_layout_file(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=own.var_names)), versioned)
        files[size] = folder / f"new-{size}.h5ad"
        write_member(adata, files[size])
    return files


def _score(released, path, capsys, *extra: str) -> dict:
    argv = ["score", str(path), "--config", str(released["config"].source), "--member", MEMBER]
    argv += ["--run", str(released["folder"] / "run"), "--json", *extra]
    code = cli(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_a_sample_scores_the_same_alone_with_one_other_and_with_199_others(released, batches, capsys):
    answers = [_score(released, batches[size], capsys)["samples"]["patient-1"] for size in (1, 2, 200)]
    for endpoint in ("marker", "pfs", "response"):
        values = [a[endpoint] for a in answers]
        assert np.isfinite(values).all()
        np.testing.assert_allclose(values, values[0], rtol=0, atol=1e-6)
    assert 0.0 < answers[0]["response"] < 1.0  # a probability

    # the registered pyfunc model, given the same sample as columns with the member's scaling file
    mlflow.set_tracking_uri(released["uri"])
    model = mlflow.pyfunc.load_model(released["report"]["tracking"]["registered_model"])
    frame = _frame(read_member(batches[200]))
    direct = model.predict(frame, params={"scaling": str(released["scaling"][MEMBER])})
    for endpoint in ("marker", "pfs", "response"):
        assert direct.loc["patient-1", endpoint] == pytest.approx(answers[0][endpoint], abs=1e-6)


def _frame(adata: ad.AnnData) -> pd.DataFrame:
    """The pyfunc input for a file in the member's layout: ids as columns (MLflow's signature names them
    without version suffix), counts, library size."""
    counts = np.asarray(adata.layers["counts"], dtype=np.float64)
    ids = [i.split(".")[0] for i in adata.var["gene_ids"]]
    frame = pd.DataFrame(counts, index=adata.obs_names, columns=ids)
    frame["library_size"] = counts.sum(axis=1)
    return frame


def test_score_prints_alerts_and_intervals_and_writes_a_csv(released, batches, capsys, tmp_path):
    out = tmp_path / "scores.csv"
    argv = ["score", str(batches[200]), "--config", str(released["config"].source), "--member", MEMBER]
    argv += ["--run", str(released["folder"] / "run"), "--alert", "response>0.5", "--out", str(out)]
    assert cli(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    table = pd.read_csv(out, index_col="sample")
    flagged = int((table["response"] > 0.5).sum())
    assert f"alert response>0.5: {flagged} of 200 samples" in printed
    assert table["alert response>0.5"].sum() == flagged
    assert "response: probability" in printed and "marker: target units" in printed
    assert len(table) == 200


def test_score_bad_input_names_the_value_and_the_fix(released, batches, capsys, tmp_path):
    base = ["--config", str(released["config"].source), "--member", MEMBER, "--run", str(released["folder"] / "run")]
    adata = read_member(batches[2])
    adata.layers["counts"][1, 4] = -3.0
    bad = tmp_path / "negative.h5ad"
    write_member(adata, bad)
    assert cli(["score", str(bad), *base]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"column '{adata.var['gene_ids'].iloc[4].split('.')[0]}' is -3 for sample 'other-0'" in err
    assert "give the raw counts" in err
    assert cli(["score", str(batches[2]), *base, "--alert", "survival>1"]) == 2
    assert "no shared endpoint 'survival'; the model predicts" in capsys.readouterr().err
    assert cli(["score", str(batches[2]), *base, "--scaling", str(tmp_path / "none.json")]) == 2
    assert "no such scaling file" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_the_pyfunc_model(released, batches, capsys):
    expected = _score(released, batches[2], capsys)["samples"]
    (port,) = free_ports(1)
    uri = released["report"]["tracking"]["registered_model"]
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    # MLflow starts uvicorn by name: the environment's scripts first on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": released["uri"], "PATH": path}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_until(
            lambda: _ping(port) or server.poll() is not None, timeout=180, what="mlflow models serve to answer /ping"
        )
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        frame = _frame(read_member(batches[2]))
        body = {
            "dataframe_split": json.loads(frame.to_json(orient="split")),
            "params": {"scaling": str(released["scaling"][MEMBER])},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        for row, sample in zip(answer, frame.index, strict=True):
            for endpoint in ("marker", "pfs", "response"):
                assert row[endpoint] == pytest.approx(expected[sample][endpoint], abs=1e-6)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_the_scores_table_shows_sample_ids_and_endpoint_names_whole_at_80_columns():
    import io
    from types import SimpleNamespace

    from consortium.commands.score import print_scores
    from consortium.console import Console
    from consortium.scoring import parse_alert

    long_rate, long_flag = "patients_enrolled_per_month", "site_never_enrolls_a_patient"
    alert = parse_alert(f"{long_flag}>0.5", endpoints=[long_rate, long_flag])
    sample = "sponsor-alpha-candidate-site-000017"
    table = pd.DataFrame(
        {
            long_rate: [0.23],
            f"{long_rate}_low": [-0.4],
            f"{long_rate}_high": [0.87],
            long_flag: [0.62],
            f"{long_flag}_set": ["0,1"],
            f"alert {alert}": [True],
        },
        index=[sample],
    )
    scores = SimpleNamespace(
        table=table,
        model_uri="models:/c/1",
        endpoints={long_rate: "regression", long_flag: "binary"},
        alerts=[alert],
        coverage={},
        calibration={},
    )
    stream = io.StringIO()
    print_scores(scores, console=Console(file=stream, width=80))
    printed = stream.getvalue()
    tables = [line for line in printed.splitlines() if line[:1] in "┏┃┡│└"]  # text lines stay whole when piped
    assert tables and max(len(line) for line in tables) <= 80
    assert printed.count(sample) == 2 and "…" not in printed
    assert long_rate in printed and long_flag in printed and "alert >0.5" in printed
