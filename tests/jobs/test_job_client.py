"""The member site's Client API script, driven by a fake ``flare`` (no FLARE processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from jobs.biomarker_mtl import client, site
from jobs.biomarker_mtl.job import server_model
from jobs.site_outputs import OUTPUTS_ENV, read_metrics, read_rankings
from models.network import MultitaskNet, SharedTrunk
from schema.config import load_config
from schema.errors import ConfigError


class FakeFlare:
    """Stands in for ``nvflare.client``: hands out ``rounds`` global trunks, keeps what is sent."""

    def __init__(self, trunk: dict[str, np.ndarray], *, site_name: str, rounds: int) -> None:
        self.trunk, self.site_name, self.rounds = trunk, site_name, rounds
        self.sent: list[FLModel] = []
        self.received = 0
        self.initialized = False

    def init(self, *args, **kwargs) -> None:
        self.initialized = True

    def get_site_name(self) -> str:
        return self.site_name

    def get_job_id(self) -> str:
        return "job-1"

    def is_running(self) -> bool:
        return self.received < self.rounds

    def receive(self, timeout=None) -> FLModel:
        model = FLModel(params=dict(self.trunk), current_round=self.received, total_rounds=self.rounds)
        self.received += 1
        return model

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        self.sent.append(model)


class RecordingWriter:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int | None]] = []

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.logged.append((key, value, step))


def _n_features(config) -> int:
    return len(config.panel_features())


def _server_trunk(config) -> SharedTrunk:
    spec = server_model(config)
    return SharedTrunk(**spec["args"])


@pytest.fixture
def config(tiny_consortium: Path):
    return load_config(tiny_consortium)


@pytest.fixture
def fake_run(config, tiny_consortium: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run client.main() for 2 rounds as member pharma-a; return (fake flare, writer, outputs folder)."""
    trunk = {k: v.numpy() for k, v in _server_trunk(config).state_dict().items()}
    fake = FakeFlare(trunk, site_name="pharma-a", rounds=2)
    writer = RecordingWriter()
    monkeypatch.setattr(client, "flare", fake)
    monkeypatch.setattr(client, "MLflowWriter", lambda: writer)
    client.main(["--config", str(tiny_consortium), "--outputs", str(tmp_path / "sites")])
    return fake, writer, tmp_path / "sites" / "pharma-a"


def test_client_sends_only_the_trunk(fake_run, config) -> None:
    fake, _, _ = fake_run
    server_keys = set(_server_trunk(config).state_dict())
    assert fake.initialized
    assert len(fake.sent) == 2
    for sent in fake.sent:
        assert set(sent.params) == server_keys
        assert all(key.startswith("trunk.") for key in sent.params)
        assert sent.params_type == ParamsType.FULL
        assert all(torch.is_tensor(v) for v in sent.params.values())  # the PT Client API needs tensors
        assert sent.meta["NUM_STEPS_CURRENT_ROUND"] > 0
        assert 0.0 <= sent.metrics[site.KEY_METRIC] <= 1.0
    heads = {
        k
        for k in MultitaskNet(_n_features(config), site.member_data.task_specs(config, "pharma-a")).state_dict()
        if k.startswith("heads.")
    }
    assert heads and not heads & set(fake.sent[0].params)


def test_client_writes_round_records_model_and_rankings(fake_run, config) -> None:
    fake, writer, folder = fake_run
    records = read_metrics(folder)
    assert [r["round"] for r in records] == [0, 1]
    tasks = [t.name for t in config.member("pharma-a").tasks]
    for record, sent in zip(records, fake.sent, strict=True):
        assert record["site"] == "pharma-a" and record["total_rounds"] == 2
        assert record["bytes_sent"] == sum(v.numel() * v.element_size() for v in sent.params.values())
        assert set(record["val"]) == set(tasks) and set(record["test"]) == set(tasks)
        assert record["steps"] == sent.meta["NUM_STEPS_CURRENT_ROUND"]
        assert record["epsilon"] is None  # DP off
    json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])  # strict JSON (no NaN)

    checkpoint = torch.load(folder / "model.pt", weights_only=False)
    assert any(k.startswith("heads.") for k in checkpoint["state_dict"])
    n_features = _n_features(config)
    assert checkpoint["member"] == "pharma-a" and len(checkpoint["feature_names"]) == n_features
    net = MultitaskNet(n_features, site.member_data.task_specs(config, "pharma-a"), **checkpoint["network"])
    net.load_state_dict(checkpoint["state_dict"])  # the checkpoint rebuilds the member's network

    rankings = read_rankings(folder)
    assert set(rankings) == set(tasks)
    for table in rankings.values():
        assert list(table.columns) == ["feature", "score", "rank"]
        assert len(table) == n_features and table["rank"].tolist() == list(range(1, n_features + 1))

    steps = {(key, step) for key, _, step in writer.logged}
    assert ("train_loss", 0) in steps and ("train_loss", 1) in steps
    assert any(key.startswith("val/") for key, _, _ in writer.logged)


def test_site_keeps_heads_and_trainer_across_rounds(config, tmp_path: Path) -> None:
    member = site.MemberSite(config, "pharma-b", outputs=site.SiteOutputs(tmp_path / "b"))
    trunk = {k: v.numpy() for k, v in _server_trunk(config).state_dict().items()}
    member.train_round(FLModel(params=trunk, current_round=0, total_rounds=3))
    heads_after_round_0 = member.model.head_state()
    trainer = member.trainer
    # the next global trunk replaces the trunk in place and leaves the heads as the member trained them
    member.model.load_trunk_state({k: np.zeros_like(v) for k, v in trunk.items()})
    for key, value in member.model.head_state().items():
        assert torch.equal(value, heads_after_round_0[key])
    assert all(torch.count_nonzero(v) == 0 for v in member.model.trunk_state().values())
    member.train_round(FLModel(params=trunk, current_round=1, total_rounds=3))
    assert member.trainer is trainer and trainer.epochs_done == 2 * config.training.local_epochs
    assert not member.rankings_written  # rankings come with the last round only


def test_outgoing_trunk_refuses_a_head_key(config, monkeypatch: pytest.MonkeyPatch) -> None:
    net = MultitaskNet(_n_features(config), site.member_data.task_specs(config, "pharma-a"))
    leaky = {**net.trunk_state(), "heads.a_pfs.0.weight": torch.zeros(1)}
    monkeypatch.setattr(net, "trunk_state", lambda: leaky)
    with pytest.raises(site.PrivateStateLeak, match=r"heads\.a_pfs\.0\.weight"):
        site.outgoing_trunk(net)


def test_client_paths_from_arguments_environment_or_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client.CONFIG_ENV, raising=False)
    monkeypatch.delenv(OUTPUTS_ENV, raising=False)
    with pytest.raises(ConfigError, match="CONSORTIUM_CONFIG"):
        client.config_path(None)
    monkeypatch.setenv(client.CONFIG_ENV, str(tmp_path / "c.yaml"))
    assert client.config_path(None) == tmp_path / "c.yaml"
    assert client.config_path(Path("x.yaml")) == Path("x.yaml")

    monkeypatch.chdir(tmp_path)
    assert client.outputs_root(None, job_id="j1") == tmp_path / "consortium_outputs" / "j1"
    monkeypatch.setenv(OUTPUTS_ENV, str(tmp_path / "site-out"))
    assert client.outputs_root(None, job_id="j1") == tmp_path / "site-out"
    assert client.outputs_root(tmp_path / "given", job_id="j1") == tmp_path / "given"


def test_client_refuses_a_site_that_is_no_member(
    config, tiny_consortium: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "flare", FakeFlare({}, site_name="site-1", rounds=1))
    with pytest.raises(ConfigError, match="no member 'site-1'; members are: pharma-a, pharma-b"):
        client.main(["--config", str(tiny_consortium), "--outputs", str(tmp_path)])


def test_dp_site_records_the_epsilon_it_spends(config, tmp_path: Path) -> None:
    privacy = config.privacy.model_copy(update={"dp": config.privacy.dp.model_copy(update={"enabled": True})})
    dp_config = config.model_copy(update={"privacy": privacy})
    member = site.MemberSite(dp_config, "pharma-a", outputs=site.SiteOutputs(tmp_path / "a"))
    trunk = {k: v.numpy() for k, v in _server_trunk(config).state_dict().items()}
    sent = [member.train_round(FLModel(params=trunk, current_round=r, total_rounds=2)) for r in range(2)]
    epsilons = [r["epsilon"] for r in read_metrics(tmp_path / "a")]
    assert 0 < epsilons[0] < epsilons[1] <= dp_config.privacy.dp.epsilon * 1.01  # the budget covers all rounds
    assert sent[1].metrics["epsilon"] == pytest.approx(epsilons[1])
    assert all(set(s.params) == set(_server_trunk(config).state_dict()) for s in sent)  # no Opacus '_module.' keys
