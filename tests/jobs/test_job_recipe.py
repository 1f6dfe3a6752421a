"""The consortium job's recipe, plaintext and HE, as exported (no FLARE processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.recipe import SimEnv

from jobs import job
from jobs.recipe import CLIENT_SCRIPT, ConsortiumRecipe, build_recipe, export_job, job_name
from schema.config import load_config
from schema.names import HE_SCOPE, TRAIN_TASK


def _exported(folder: Path) -> tuple[dict, dict, dict]:
    app = folder / "app" / "config"
    return (
        json.loads((app / "config_fed_server.json").read_text()),
        json.loads((app / "config_fed_client.json").read_text()),
        json.loads((folder / "meta.json").read_text()),
    )


def _component(config: dict, component_id: str) -> dict:
    return next(c for c in config["components"] if c["id"] == component_id)


def _filters(chains: list[dict]) -> list[tuple[list[str], list[str]]]:
    return [(chain["tasks"], [f["path"] for f in chain["filters"]]) for chain in chains]


@pytest.fixture(scope="module")
def config(shared_consortium: Path):
    return load_config(shared_consortium)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "he"])
def exported(request, config, shared_consortium: Path, tmp_path_factory) -> tuple[bool, Path, dict, dict, dict]:
    he = request.param
    out = tmp_path_factory.mktemp("export")
    recipe = build_recipe(
        config,
        he=he,
        config_path=shared_consortium,
        outputs=out / "sites",
        rounds=3,
        tracking_uri="sqlite:///" + str(out / "mlflow.db"),
    )
    assert isinstance(recipe, ConsortiumRecipe) and recipe.he is he
    recipe.export(str(out / "job"))
    return (he, out, *_exported(out / "job" / recipe.name))


def test_server_sums_sections_and_records_what_sites_publish(exported, config):
    he, _, server, _, _ = exported
    aggregator = _component(server, "aggregator")
    assert aggregator["path"] == "jobs.aggregation.SectionSumAggregator"
    assert aggregator["args"].get("he", False) is he
    assert _component(server, "shareable_generator")["path"] == "jobs.aggregation.SectionShareableGenerator"
    persistor = _component(server, "persistor")
    assert persistor["path"] == "jobs.aggregation.SectionAggregatePersistor"
    training = config.training
    assert persistor["args"]["model"] == {
        "path": "models.network.SharedModel",
        "args": {
            "n_features": 200,
            "shared_tasks": ["pfs"],
            "trunk_widths": training.trunk_widths,
            "head_width": training.head_width,
            "dropout": training.dropout,
            "seed": training.seed,
        },
    }
    (workflow,) = server["workflows"]
    assert workflow["path"] == "jobs.workflow.SumScatterAndGather"  # FLARE's, with its check period honoured
    assert workflow["args"]["num_rounds"] == 3 and workflow["args"]["min_clients"] == 2
    assert _filters(server["task_result_filters"]) == [([TRAIN_TASK], ["jobs.published.PublishedResultsRecorder"])]
    assert server["task_data_filters"] == []
    flat = json.dumps(server)
    assert "EncryptSections" not in flat and "DecryptAggregate" not in flat  # the server holds no member filter


def test_members_encrypt_and_decrypt_only_with_he(exported):
    he, _, _, client, _ = exported
    if he:
        assert _filters(client["task_data_filters"]) == [([TRAIN_TASK], ["jobs.he.filters.DecryptAggregate"])]
        assert _filters(client["task_result_filters"]) == [([TRAIN_TASK], ["jobs.he.filters.EncryptSections"])]
    else:
        assert client["task_data_filters"] == [] and client["task_result_filters"] == []


def test_job_declares_the_sites_he_scope_only_with_he(exported):
    he, _, _, _, meta = exported
    assert meta["min_clients"] == 2
    if he:
        assert meta["scope"] == HE_SCOPE == "consortium-he"
    else:
        assert "scope" not in meta


def test_sites_get_paths_only_and_the_server_an_mlflow_receiver(exported, config, shared_consortium):
    he, out, server, client, _ = exported
    (executor,) = client["executors"]
    args = executor["executor"]["args"]
    assert args["task_script_path"] == str(CLIENT_SCRIPT)
    # only paths travel as arguments; every hyper-parameter comes from consortium.yaml
    assert args["task_script_args"] == f"--config {shared_consortium.resolve()} --outputs {out / 'sites'}"
    component = _component(server, "receiver")
    assert component["path"] == "jobs.tracking.MemberRuns"
    receiver = component["args"]
    assert receiver["tracking_uri"] == "sqlite:///" + str(out / "mlflow.db")
    params = receiver["params"]["pharma-a"]  # each member's run records its parameters
    assert params["member"] == "pharma-a" and params["rounds"] == "3"
    assert params["aggregation"] == ("fedavg under HE" if he else "fedavg")
    assert params["tasks"] == ",".join(
        f"{t.name}:{t.type}{' (shared)' if t.name in config.shared_endpoints() else ''}"
        for t in config.member("pharma-a").tasks
    )
    assert receiver["kw_args"]["experiment_name"] == config.tracking.experiment
    assert receiver["kw_args"]["run_name"] == ("he-fedavg" if he else "fedavg")
    assert receiver["kw_args"]["run_tags"] == {"consortium": config.name, "he": "on" if he else "off", "dp": "off"}


def test_the_job_end_mark_is_the_last_server_component(exported):
    """FLARE ends the components in the job's order: the mark is written after every other one ended."""
    _, _, server, _, _ = exported
    assert server["components"][-1]["id"] == "job_end"
    assert server["components"][-1]["path"] == "jobs.job_end.MarkJobEnded"
    assert [c["id"] for c in server["components"]].index("receiver") < len(server["components"]) - 1


@pytest.mark.parametrize("he", [False, True])
def test_export_job_names_no_local_path(config, tmp_path, he):
    folder = export_job(config, tmp_path / "export", he=he, rounds=2)
    assert folder == tmp_path / "export" / job_name(config)
    assert folder.name == "synthetic-consortium-biomarker-mtl"
    server, client, meta = _exported(folder)
    args = client["executors"][0]["executor"]["args"]
    assert not args.get("task_script_args")  # the sites read CONSORTIUM_CONFIG
    # no code travels (leads have no byoc): the sites run the client script of their installed package
    assert "task_script_path" not in args
    assert client["executors"][0]["executor"]["path"] == "jobs.executor.InstalledClientScript"
    assert not list(folder.rglob("custom")) and not list(folder.rglob("*.py"))
    everything = json.dumps([server, client, meta])
    assert str(CLIENT_SCRIPT.parents[1]) not in everything and str(tmp_path) not in everything
    assert (meta.get("scope") == HE_SCOPE) is he


def test_the_he_recipe_refuses_the_simulator_with_the_fix(config, tmp_path):
    recipe = build_recipe(config, he=True, rounds=1)
    sim = SimEnv(clients=["pharma-a", "pharma-b"], workspace_root=str(tmp_path / "sim"))
    with pytest.raises(ValueError, match=r"cannot run in FLARE's simulator \(SimEnv\).*'consortium run --env poc'"):
        recipe.process_env(sim)
    with pytest.raises(ValueError, match="cannot run in FLARE's simulator"):
        recipe.execute(sim)
    assert not (tmp_path / "sim").exists()  # refused before anything was written
    build_recipe(config, he=False, rounds=1).process_env(sim)  # the plaintext job is welcome there


def test_only_the_simulated_job_paces_its_members_task_requests(config, tmp_path):
    """The simulator's members get jobs.flare_tuning.SimulatorTaskPacing; an exported job (POC, kits) does not."""
    recipe = build_recipe(config, he=False, rounds=2)
    sim = SimEnv(clients=["pharma-a", "pharma-b"], workspace_root=str(tmp_path / "sim"))
    recipe.export(str(tmp_path / "plain"))
    recipe.export(str(tmp_path / "sim-job"), env=sim)
    recipe.export(str(tmp_path / "sim-again"), env=sim)  # added once, however often the recipe meets SimEnv

    def pacing(folder: Path) -> list[dict]:
        _, client, _ = _exported(folder / recipe.name)
        return [c for c in client["components"] if c["path"].endswith("SimulatorTaskPacing")]

    assert pacing(tmp_path / "plain") == []
    for folder in ("sim-job", "sim-again"):
        [component] = pacing(tmp_path / folder)
        assert component["path"] == "jobs.flare_tuning.SimulatorTaskPacing"


def test_fold_rounds_and_paths_are_checked(config, tmp_path):
    recipe = build_recipe(config, he=False, fold=2, outputs=tmp_path / "sites")
    assert recipe.name == f"{job_name(config)}-fold2" and recipe.num_rounds == config.training.rounds
    recipe.export(str(tmp_path / "export"))
    _, client, _ = _exported(tmp_path / "export" / recipe.name)
    assert client["executors"][0]["executor"]["args"]["task_script_args"] == f"--fold 2 --outputs {tmp_path / 'sites'}"
    with pytest.raises(ValueError, match="whitespace, which FLARE's train_args cannot carry"):
        build_recipe(config, he=False, outputs=tmp_path / "a b")
    with pytest.raises(ValueError, match="num_rounds=0; a federated run needs at least one round"):
        build_recipe(config, he=False, rounds=0)


def test_job_script_exports_like_hello_pt(shared_consortium, tmp_path, capsys):
    job.main(["--config", str(shared_consortium), "--export-to", str(tmp_path / "exported"), "--rounds", "4"])
    folder = tmp_path / "exported" / "synthetic-consortium-biomarker-mtl"
    assert f"nvflare job submit -j {folder}" in capsys.readouterr().out
    server, _, meta = _exported(folder)
    assert meta["scope"] == HE_SCOPE  # privacy.he.enabled in the config
    assert server["workflows"][0]["args"]["num_rounds"] == 4
    job.main(["--config", str(shared_consortium), "--export-to", str(tmp_path / "plain"), "--no-he"])
    _, _, meta = _exported(tmp_path / "plain" / "synthetic-consortium-biomarker-mtl")
    assert "scope" not in meta


def test_the_job_sets_flare_polling_short(exported):
    """FLARE's 2 s task-request interval and 0.5 s task checks would add ~2.5 s to every round."""
    _, _, server, client, _ = exported
    assert server["server"]["task_request_interval"] <= 0.2
    (workflow,) = server["workflows"]
    assert workflow["args"]["task_check_period"] <= 0.1
    assert workflow["args"]["memory_gc_rounds"] == 0  # no gc.collect between a round's end and the next
    assert client["default_task_fetch_interval"] <= 0.2
