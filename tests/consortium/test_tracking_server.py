"""``tracking.uri`` naming an MLflow tracking server: the field's checks, and a real ``mlflow server`` that a
simulated consortium run writes to, read back over MLflow's REST API (docs/tracking.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from consortium.commands.synth import synthesize
from consortium.shared_model import check_tracking_server, tracking_uri_for
from schema.config import config_from_dict
from schema.errors import ConfigError, UserError
from tests.helpers import free_ports, stop_site, wait_until

# -- the field ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://mlflow.example.org/team/", "https://mlflow.example.org/team"),
        ("sqlite:////srv/mlflow/mlflow.db", "sqlite:////srv/mlflow/mlflow.db"),
        ("/srv/mlflow/mlflow.db", "sqlite:////srv/mlflow/mlflow.db"),  # a plain path names the SQLite file
    ],
)
def test_a_tracking_server_or_a_sqlite_file_is_taken(small_config_dict, tmp_path, given, kept):
    small_config_dict["tracking"] = {"uri": given}
    config = config_from_dict(small_config_dict, source=tmp_path / "consortium.yaml")
    assert config.tracking.uri == kept
    assert tracking_uri_for(config, out=tmp_path / "run") == kept


def test_without_a_uri_each_run_keeps_its_own_sqlite_store(small_config_dict, tmp_path):
    config = config_from_dict(small_config_dict, source=tmp_path / "consortium.yaml")
    assert config.tracking.uri is None
    assert tracking_uri_for(config, out=tmp_path / "run") == f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}"


@pytest.mark.parametrize("given", ["sqlite:///runs/mlflow.db", "runs/mlflow.db"])
def test_a_relative_sqlite_file_lies_next_to_consortium_yaml(small_config_dict, tmp_path, given):
    """Not under whatever folder a job process runs in (FLARE's server runs in its own workspace)."""
    small_config_dict["tracking"] = {"uri": given}
    config = config_from_dict(small_config_dict, source=tmp_path / "study" / "consortium.yaml")
    assert config.tracking.uri == f"sqlite:///{tmp_path.resolve() / 'study' / 'runs' / 'mlflow.db'}"


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("localhost:5000", "names no scheme; give http://localhost:5000"),
        ("http://:5000", "names no host"),
        ("http://mlflow:99999", "has no valid port"),
        ("https://ana:secret@mlflow:5000", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ("file:///srv/mlruns", "MLflow file store, which MLflow 3 refuses"),
        ("sqlite:///:memory:", "names no database file"),
        ("postgresql://mlflow@db/mlflow", "has scheme 'postgresql:'"),
        ("  ", "is empty"),
    ],
)
def test_a_bad_uri_is_refused_naming_the_field_and_the_fix(small_config_dict, tmp_path, given, says):
    small_config_dict["tracking"] = {"uri": given}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(small_config_dict, source=tmp_path / "consortium.yaml")
    message = str(caught.value)
    assert "tracking.uri = " in message and says in message
    assert "secret" not in message  # a password given there is not repeated


def test_a_server_nobody_answers_at_is_a_clear_error_before_the_run():
    [port] = free_ports(1)
    with pytest.raises(UserError, match=rf"tracking.uri = http://127.0.0.1:{port}: no MLflow tracking server answers"):
        check_tracking_server(f"http://127.0.0.1:{port}", timeout=5)


# -- a real tracking server -----------------------------------------------------------------------------


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` on loopback (SQLite backend, artifacts proxied to a local folder); its URL and
    that folder. Stopped with its process group (uvicorn and its job runner) whatever the test does."""
    [port] = free_ports(1)
    folder = tmp_path / "tracking-server"
    folder.mkdir()
    artifacts = folder / "artifacts"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(artifacts)]
    command += ["--workers", "1"]
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed with the server
    server = subprocess.Popen(
        command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: server.poll() is not None or _healthy(url), timeout=180, interval=0.5, what="the MLflow server"
        )
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        yield url, artifacts
    finally:
        stop_site(server)  # SIGTERM, then SIGKILL, to the server's process group
        log.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _rest(url: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    """One call of MLflow's REST API (``/api/2.0/mlflow/<endpoint>``): GET with ``query``, POST with ``body``."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_a_run_writes_its_runs_metrics_and_registered_model_to_a_tracking_server(tracking_server, tmp_path):
    url, artifacts = tracking_server
    data = tmp_path / "data"
    config_path = synthesize(data, sizes=[100, 150], n_features=200, seed=5, rounds=2, shared=("marker",))
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"] = {"uri": url, "experiment": "tracking-server-test"}
    config_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    # two rounds: a metric history of one point would not tell a history from a last value
    args = ["run", "--config", str(config_path), "--env", "sim", "--out", str(out), "--rounds", "2", "--no-he"]
    done = subprocess.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["tracking"]["uri"] == url
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()  # nothing went to the file store

    experiment = _rest(url, "experiments/get-by-name", experiment_name="tracking-server-test")["experiment"]
    assert experiment["artifact_location"] == f"mlflow-artifacts:/{experiment['experiment_id']}"  # proxied
    runs = _rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    tags = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"]["tags"]} for run in runs}
    members = {tags[r["info"]["run_id"]]["member"]: r for r in runs if tags[r["info"]["run_id"]]["kind"] == "member"}
    [shared] = [r for r in runs if tags[r["info"]["run_id"]]["kind"] == "shared-model"]
    assert sorted(members) == ["pharma-a", "pharma-b"]
    for member, run in members.items():
        assert run["info"]["run_name"] == member and run["info"]["status"] == "FINISHED"
        assert tags[run["info"]["run_id"]]["job_id"] == report["job_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["member"] == member and params["consortium"] == "synthetic-consortium"
        assert not any(str(data) in value for value in params.values())  # no path to a member's data
        history = _rest(url, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="train_loss")["metrics"]
        assert [m["step"] for m in history] == [0, 1]
        expected = [entry["sites"][member]["train_loss"] for entry in report["rounds"]]
        np.testing.assert_allclose([m["value"] for m in history], expected, rtol=1e-12)
        assert _rest(url, "artifacts/list", run_id=run["info"]["run_id"]).get("files", []) == []

    assert shared["info"]["run_id"] == report["tracking"]["model_run_id"]
    files = _rest(url, "artifacts/list", run_id=shared["info"]["run_id"], path="biomarkers")["files"]
    assert {"biomarkers/statistics_marker.csv", "biomarkers/model_marker.csv"} <= {f["path"] for f in files}

    registered = _rest(url, "registered-models/get", name="synthetic-consortium")["registered_model"]
    [version] = registered["latest_versions"]
    assert report["tracking"]["registered_model"] == f"models:/synthetic-consortium/{version['version']}"
    assert version["status"] == "READY" and version["run_id"] == shared["info"]["run_id"]
    logged = _rest(url, f"logged-models/{version['source'].removeprefix('models:/')}")["model"]["info"]
    location = logged["artifact_uri"].removeprefix("mlflow-artifacts:/")
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow-artifacts/artifacts/{location}/artifacts/model.json") as answer:
        spec = json.loads(answer.read())
    assert spec["endpoints"] == ["marker"] and spec["consortium"] == "synthetic-consortium"

    # what the server stores: no member's data, and of the heads only the shared endpoint's
    stored = [p for p in artifacts.rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if p.suffix in (".h5ad", ".h5")]
    [state] = [p for p in stored if p.name == "state.npz"]
    heads = {key.split(".")[1] for key in np.load(state).files if key.startswith("heads.")}
    assert heads == {"marker"}
