"""POC with the custodian's contexts: installed between prepare and start; a real HE job on POC (slow)."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import yaml
from nvflare.recipe.poc_env import PocEnv
from nvflare.tool.poc.poc_commands import prepare_poc_provision

import jobs
from jobs.he.context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, make_contexts
from jobs.he.poc import HEPocEnv, install_contexts, install_privacy_policy


@pytest.fixture(scope="module")
def contexts() -> tuple[bytes, bytes]:
    return make_contexts()


@pytest.fixture(scope="module")
def stock_he_poc(tmp_path_factory) -> Path:
    """A POC workspace prepared the stock way, with HEBuilder's (operator-made, signed) contexts."""
    workspace = tmp_path_factory.mktemp("poc")
    prepare_poc_provision(["m1", "m2"], 2, str(workspace), None, use_he=True)
    return workspace


def _kit(workspace: Path, name: str) -> Path:
    (kit,) = workspace.glob(f"*/prod_00/{name}")
    return kit


def test_custodian_contexts_replace_hebuilders(stock_he_poc, contexts):
    client, server = contexts
    written = install_contexts(stock_he_poc, server_context=server, client_context=client, clients=["m1", "m2"])
    assert len(written) == 3
    server_startup = _kit(stock_he_poc, "server") / "startup"
    assert (server_startup / SERVER_CONTEXT_FILE).read_bytes() == server
    assert not (server_startup / CLIENT_CONTEXT_FILE).exists()
    assert not ts.context_from((server_startup / SERVER_CONTEXT_FILE).read_bytes()).is_private()
    for name in ("m1", "m2"):
        startup = _kit(stock_he_poc, name) / "startup"
        assert (startup / CLIENT_CONTEXT_FILE).read_bytes() == client
        assert stat.S_IMODE((startup / CLIENT_CONTEXT_FILE).stat().st_mode) == 0o600
        signatures = json.loads((startup / "signature.json").read_text())
        assert CLIENT_CONTEXT_FILE not in signatures  # HEBuilder's signature no longer describes the file
        assert "fed_client.json" in signatures
    assert SERVER_CONTEXT_FILE not in json.loads((server_startup / "signature.json").read_text())


def test_contexts_must_be_one_key_pair_with_a_public_server_half(stock_he_poc, contexts):
    client, server = contexts
    other_client, other_server = make_contexts()
    with pytest.raises(ValueError, match="SECRET key"):
        install_contexts(stock_he_poc, server_context=client, client_context=client, clients=["m1"])
    with pytest.raises(ValueError, match="not one key pair"):
        install_contexts(stock_he_poc, server_context=other_server, client_context=client, clients=["m1"])
    with pytest.raises(ValueError, match="no POC kit for clients"):
        install_contexts(stock_he_poc, server_context=server, client_context=client, clients=["m9"])


def test_privacy_policy_lands_in_member_kits(stock_he_poc):
    policy = {"scopes": [{"name": "consortium-he"}], "default_scope": "consortium-he"}
    (path,) = install_privacy_policy(stock_he_poc, policy=policy, clients=["m1"])
    assert json.loads(path.read_text()) == policy and path.parent.name == "local"


def test_poc_env_refuses_the_operators_hebuilder(tmp_path, contexts):
    client, server = contexts
    with pytest.raises(ValueError, match="use_he=True would run NVFlare's HEBuilder"):
        HEPocEnv(clients=["m1", "m2"], use_he=True, server_context=server, client_context=client)
    project = tmp_path / "project.yml"
    project.write_text(yaml.safe_dump({"builders": [{"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}}]}))
    with pytest.raises(ValueError, match="remove the builder"):
        HEPocEnv(clients=["m1", "m2"], project_conf_path=str(project), server_context=server, client_context=client)
    assert isinstance(HEPocEnv(clients=["m1", "m2"], server_context=server, client_context=client), PocEnv)
    assert HEPocEnv(clients=["m1", "m2", "m3"], server_context=server, client_context=client).num_clients == 3


def _on_free_ports(config_path: Path) -> Path:
    """A copy of consortium.yaml whose operator listens on two free ports (other POCs may hold the defaults)."""
    raw = yaml.safe_load(config_path.read_text())
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    raw["operator"].update({"fl_port": ports[0], "admin_port": ports[1]})
    copy = config_path.with_name(f"consortium-{ports[0]}.yaml")  # next to it: relative data paths still hold
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def _poc_setup(config_path: Path, tmp_path: Path, monkeypatch, contexts):
    """The consortium on free ports, FLARE processes that import the project, and an HEPocEnv with the
    custodian's contexts and the sites' privacy policy; returns (config path, config, env)."""
    from jobs.runner import POC_ADMIN, poc_project
    from provisioning.policies import privacy_policy
    from schema.config import load_config

    config_path = _on_free_ports(config_path)
    config = load_config(config_path)
    root = str(Path(jobs.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    project = tmp_path / "project.yml"
    project.write_text(yaml.safe_dump(poc_project(config), sort_keys=False))
    client, server = contexts
    env = HEPocEnv(
        clients=[m.name for m in config.members],
        project_conf_path=str(project),
        username=POC_ADMIN,
        server_context=server,
        client_context=client,
        privacy_policy=privacy_policy(config),
    )
    return config_path, config, env


@pytest.mark.slow
def test_he_job_on_poc_two_members_two_rounds(tiny_consortium, tmp_path, monkeypatch, contexts):
    """The whole path: custodian contexts, site policy, encrypted rounds; members end on one trunk."""
    from jobs.he.recipe import build_he_recipe

    tiny_consortium, config, env = _poc_setup(tiny_consortium, tmp_path, monkeypatch, contexts)
    client, _ = contexts
    members = [m.name for m in config.members]
    recipe = build_he_recipe(config, config_path=tiny_consortium, outputs=tmp_path / "sites", rounds=2)
    try:
        run = recipe.run(env)
        result = run.get_result(timeout=600, clean_up=False)
        status = run.get_status()
    finally:
        env.stop(clean_up=False)
    assert result is not None and "COMPLETED" in str(status), f"status {status}; logs under {tmp_path / 'poc'}"
    (stored,) = Path(result).rglob("FL_global_model.ckks")
    from jobs.he.store import decrypt_aggregate_file, read_encrypted_aggregate

    aggregate = read_encrypted_aggregate(stored)
    assert aggregate.contributors == 2
    trunk = decrypt_aggregate_file(stored, client_context=client)
    assert all(name.startswith("trunk.") and np.all(np.isfinite(v)) for name, v in trunk.items())
    for name in members:
        records = (tmp_path / "sites" / name / "metrics.jsonl").read_text().splitlines()
        assert len(records) == 2


@pytest.mark.slow
def test_site_policy_stops_a_plaintext_job_on_poc(tiny_consortium, tmp_path, monkeypatch, contexts):
    """A job that claims the sites' HE scope but sends plaintext: the members refuse to send it."""
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.recipe.utils import set_recipe_meta

    from jobs.biomarker_mtl.job import build_recipe
    from provisioning.policies import SCOPE

    tiny_consortium, config, env = _poc_setup(tiny_consortium, tmp_path, monkeypatch, contexts)
    recipe = build_recipe(config, config_path=tiny_consortium, outputs=tmp_path / "sites", rounds=1, he=False)
    set_recipe_meta(recipe, JobMetaKey.SCOPE, SCOPE)  # the sites' scope, but no encryption
    try:
        run = recipe.run(env)
        run.get_result(timeout=300, clean_up=False)
        status = str(run.get_status())
    finally:
        env.stop(clean_up=False)
    assert "COMPLETED" not in status, status
    member_logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "poc").glob("*/prod_*/pharma-*/*/log.txt"))
    assert "RequireEncryptedResult" in member_logs and "would send a plaintext model" in member_logs
