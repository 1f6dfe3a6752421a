"""Real FLARE runs of the biomarker job: the simulator and a POC deployment, 2 members."""

from __future__ import annotations

import socket
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from jobs.biomarker_mtl.job import server_model
from jobs.runner import FederatedRun, FederatedRunError, run_federated
from models.network import SharedTrunk
from schema.config import dump_config, load_config

pytestmark = pytest.mark.slow


def _trunk_keys(config) -> set[str]:
    return set(SharedTrunk(**server_model(config)["args"]).state_dict())


def _check_sites(run: FederatedRun, config, rounds: int) -> None:
    assert set(run.site_outputs) == {m.name for m in config.members}
    for member in config.members:
        folder = run.site_outputs[member.name]
        assert folder == run.out / "sites" / member.name
        records = run.metrics[member.name]
        assert [r["round"] for r in records] == list(range(rounds))
        assert all(r["site"] == member.name and r["bytes_sent"] > 0 for r in records)
        assert (folder / "model.pt").exists()
        assert {p.name for p in folder.glob("biomarkers_*.csv")} == {f"biomarkers_{t.name}.csv" for t in member.tasks}


def _check_global_model(run: FederatedRun, config) -> None:
    assert run.global_model is not None and run.global_model.exists()
    saved = torch.load(run.global_model, weights_only=False)
    assert set(saved["model"]) == _trunk_keys(config)  # the server never held a head


def _mlflow_runs(run: FederatedRun, config) -> dict[str, object]:
    mlflow.set_tracking_uri(run.tracking_uri)
    experiment = MlflowClient().get_experiment_by_name(config.tracking.experiment)
    assert experiment is not None
    runs = MlflowClient().search_runs([experiment.experiment_id])
    members = [m.name for m in config.members]
    by_site = {m: [r for r in runs if r.info.run_name.startswith(f"{m}-")] for m in members}
    assert all(len(site_runs) == 1 for site_runs in by_site.values()), by_site
    return {m: site_runs[0] for m, site_runs in by_site.items()}


def test_simulator_two_members_two_rounds(tiny_consortium: Path, tmp_path: Path) -> None:
    config = load_config(tiny_consortium)
    seen: list[tuple[int, int]] = []
    run = run_federated(
        config, env="sim", out=tmp_path / "run", rounds=2, progress=lambda done, total, info: seen.append((done, total))
    )

    assert run.env == "sim" and run.rounds == 2 and run.seconds > 0
    assert run.tracking_uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    _check_sites(run, config, rounds=2)
    _check_global_model(run, config)
    assert seen and seen[-1] == (2, 2)

    by_site = _mlflow_runs(run, config)
    assert set(by_site) == {"pharma-a", "pharma-b"}  # one MLflow run per site
    client = MlflowClient()
    for site_run in by_site.values():
        assert site_run.data.tags["he"] == "off" and site_run.data.tags["consortium"] == config.name
        history = client.get_metric_history(site_run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [0, 1]
        assert any(key.startswith("val/") for key in site_run.data.metrics)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_poc_two_members(tiny_consortium: Path, tmp_path: Path) -> None:
    config = load_config(tiny_consortium)
    # free ports for this test's server, so it can run beside another FLARE on this machine
    fl_port, admin_port = _free_port(), _free_port()
    operator = config.operator.model_copy(update={"fl_port": fl_port, "admin_port": admin_port})
    config = config.model_copy(update={"operator": operator})

    run = run_federated(config, env="poc", out=tmp_path / "run", rounds=2, timeout=540)

    assert run.env == "poc" and run.status == "FINISHED:COMPLETED"
    assert str(run.result_dir).startswith(str(tmp_path / "run" / "flare"))
    _check_sites(run, config, rounds=2)
    _check_global_model(run, config)
    assert set(_mlflow_runs(run, config)) == {"pharma-a", "pharma-b"}
    assert _port_is_free(fl_port) and _port_is_free(admin_port)  # the POC server is gone


def test_poc_with_he_aggregation(tiny_consortium: Path, tmp_path: Path) -> None:
    pytest.importorskip("jobs.he.poc")
    config = load_config(tiny_consortium)
    operator = config.operator.model_copy(update={"fl_port": _free_port(), "admin_port": _free_port()})
    config = config.model_copy(update={"operator": operator})

    run = run_federated(config, env="poc", out=tmp_path / "run", rounds=1, he=True, timeout=540)

    assert run.he and run.status == "FINISHED:COMPLETED"
    _check_sites(run, config, rounds=1)
    assert run.global_model is not None and run.global_model.name == "FL_global_model.ckks"
    assert set(run.kits) == {"server", "pharma-a", "pharma-b"}
    assert (run.kits["pharma-a"] / "startup" / "client_context.tenseal").exists()
    assert not (run.kits["server"] / "startup" / "client_context.tenseal").exists()  # no secret key there
    for site_run in _mlflow_runs(run, config).values():
        assert site_run.data.tags["he"] == "on"


def test_a_failing_site_fails_the_run_with_its_error(tiny_consortium: Path, tmp_path: Path) -> None:
    config = load_config(tiny_consortium)
    broken = config.members[1].model_copy(update={"data": tmp_path / "missing.h5ad"})
    config_path = tmp_path / "broken.yaml"
    dump_config(config.model_copy(update={"members": [config.members[0], broken]}), config_path)

    with pytest.raises(FederatedRunError, match=r"(?s)logs in .*pharma-b: .*missing\.h5ad"):
        run_federated(load_config(config_path), env="sim", out=tmp_path / "run", rounds=1)
