"""A member site across the rounds (no FLARE processes): what leaves it, what it loads, what it publishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from jobs.member_data import task_specs
from jobs.recipe import server_model
from jobs.sections import PUBLISHED_META, finalize, section_of, sections_of
from jobs.site import STEPS_META, MemberSite, PrivateStateLeak, outgoing_state, serve
from jobs.site_outputs import SiteOutputs, read_predictions, read_scaling
from models.network import MultitaskNet, SharedModel
from omics.normalize import scale_features
from schema.config import load_config
from schema.names import KEY_METRIC

SHARED_ENDPOINT = "pfs"  # both members' survival task in the shared_consortium fixture


class FakeFlare:
    """Stands in for ``nvflare.client``: round 0 brings the server's model, later rounds the sum of what was sent.

    With one member the sum is that member's own update, so round ``r`` receives what round ``r - 1`` sent,
    as numpy arrays with its sections meta (what the Client API hands the script).
    """

    def __init__(self, initial: dict[str, np.ndarray], *, site_name: str, rounds: int) -> None:
        self.initial, self.site_name, self.rounds = initial, site_name, rounds
        self.sent: list[FLModel] = []
        self.received: list[FLModel] = []
        self.initialized = False

    def init(self, *args, **kwargs) -> None:
        self.initialized = True

    def get_site_name(self) -> str:
        return self.site_name

    def get_job_id(self) -> str:
        return "job-1"

    def is_running(self) -> bool:
        return len(self.received) < self.rounds

    def receive(self, timeout=None) -> FLModel | None:
        current = len(self.received)
        if current >= self.rounds:
            return None  # the job is over: the real Client API returns None at once
        if current == 0:
            model = FLModel(params=dict(self.initial), current_round=0, total_rounds=self.rounds)
        else:
            last = self.sent[-1]
            params = {k: v.numpy() for k, v in last.params.items() if k.startswith(("trunk.", "heads."))}
            sections = {n: s.to_meta() for n, s in sections_of(last.meta).items() if n.startswith(("trunk", "head:"))}
            model = FLModel(
                params=params, meta={"consortium_sections": sections}, current_round=current, total_rounds=self.rounds
            )
        self.received.append(model)
        return model

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        self.sent.append(model)


class RecordingWriter:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int | None]] = []

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.logged.append((key, value, step))


def initial_model(config) -> dict[str, np.ndarray]:
    """The server's round-0 model, built from the recipe's class path and arguments."""
    spec = server_model(config)
    assert spec["class_path"] == "models.network.SharedModel"
    return {k: v.numpy() for k, v in SharedModel(**spec["args"]).state_dict().items()}


@pytest.fixture(scope="module")
def config(shared_consortium: Path):
    return load_config(shared_consortium)


@pytest.fixture(scope="module")
def served(config, tmp_path_factory) -> tuple[MemberSite, FakeFlare, RecordingWriter]:
    """pharma-a served for 2 rounds through :func:`serve`, as the client script does."""
    writer = RecordingWriter()
    site = MemberSite(
        config, "pharma-a", outputs=SiteOutputs(tmp_path_factory.mktemp("site") / "pharma-a"), tracker=writer
    )
    fake = FakeFlare(initial_model(config), site_name="pharma-a", rounds=2)
    assert serve(site, fake) == 2
    return site, fake, writer


def _shared_keys(config) -> set[str]:
    return set(initial_model(config))


def test_the_config_has_one_shared_endpoint(config):
    assert config.shared_endpoints() == [SHARED_ENDPOINT]
    specs = {t.name: t.shared for t in task_specs(config, "pharma-a")}
    assert specs == {"a_response": False, "a_marker": False, SHARED_ENDPOINT: True}


def test_a_normal_round_sends_the_trunk_and_shared_heads_only(served, config):
    _, fake, _ = served
    sent = fake.sent[0]
    keys = {k for k in sent.params if not k.startswith("coxfit.")}  # the Cox model of the covariates: sums only
    assert keys == _shared_keys(config)  # exactly the server model's keys
    assert any(k.startswith(f"heads.{SHARED_ENDPOINT}.") for k in keys)
    assert not [k for k in keys if k.startswith(("heads.a_response.", "heads.a_marker."))]
    assert not [k for k in keys if k.endswith((".target_mean", ".target_scale"))]
    assert sent.params_type == ParamsType.FULL and all(torch.is_tensor(v) for v in sent.params.values())


def test_the_last_round_adds_statistics_and_attributions(served, config):
    site, fake, _ = served
    keys = set(fake.sent[1].params)
    extra = keys - _shared_keys(config)
    tasks = ["a_response", "a_marker", SHARED_ENDPOINT]
    # synth declares age and sex: the survival endpoint's Cox model of them travels every round (coxfit)
    assert {k.split(".")[0] for k in extra} == {"stats", "consensus", "coxfit", "scaling"}
    assert {k.split(".")[1] for k in extra if not k.startswith(("coxfit.", "scaling."))} == set(tasks)
    # the pooled scaling's pieces: the panel's features (its one regression endpoint, a_marker, is private)
    assert {k for k in extra if k.startswith("scaling.")} == {
        f"scaling.features.{n}" for n in ("samples", "sum", "sumsq")
    }
    assert {k for k in extra if k.startswith("coxfit.")} == {
        f"coxfit.{SHARED_ENDPOINT}.{n}" for n in ("loglik", "gradient", "information", "events", "samples")
    }
    assert {k.split(".")[0] for k in set(fake.sent[0].params) - _shared_keys(config)} == {"coxfit"}
    assert {k for k in extra if k.startswith("consensus.")} == {
        f"consensus.{t}.{n}" for t in tasks for n in ("score", "frequency", "members")
    }
    assert not [k for k in keys if k.startswith(("heads.a_response.", "heads.a_marker."))]
    assert not [k for k in keys if k.endswith((".target_mean", ".target_scale"))]
    n_features = site.data.n_features
    assert all(fake.sent[1].params[k].shape == (n_features,) for k in extra if k.startswith("consensus."))
    # limma's pieces per feature: X'X (upper triangle of endpoint, age, sex[M]), X'y, y'y, sum y, n, members
    assert fake.sent[1].params["stats.a_response.xtx"].shape == (6 * n_features,)
    assert fake.sent[1].params["stats.a_response.xty"].shape == (3 * n_features,)


def test_updates_are_weighted_by_the_local_steps(served):
    site, fake, _ = served
    for sent in fake.sent:
        steps = sent.meta[STEPS_META]
        sections = sections_of(sent.meta)
        assert steps > 0 and sections["trunk"].weight == steps and sections[f"head:{SHARED_ENDPOINT}"].weight == steps
        assert {section_of(k)[0] for k in sent.params} == set(sections)
    last = fake.sent[1]
    plain = finalize({k: v.numpy() for k, v in last.params.items()}, last.meta)
    for key, value in site.model.shared_state().items():  # the final model, un-weighted again
        assert np.allclose(plain[key], value.double().numpy(), rtol=1e-6, atol=1e-7), key
    assert sections_of(last.meta)[f"stats:{SHARED_ENDPOINT}"].reduce == "sum"
    assert np.allclose(plain[f"consensus.{SHARED_ENDPOINT}.members"], 1.0)
    assert np.isclose(np.abs(plain[f"consensus.{SHARED_ENDPOINT}.score"]).sum(), 1.0)


def test_published_meta_holds_val_each_round_and_test_in_the_last(served, config):
    _, fake, writer = served
    tasks = {t.name for t in config.member("pharma-a").tasks}
    first, last = (sent.meta[PUBLISHED_META] for sent in fake.sent)
    assert (first["round"], last["round"]) == (0, 1) and first["total_rounds"] == last["total_rounds"] == 2
    for published, sent in zip((first, last), fake.sent, strict=True):
        assert set(published["val"]) == tasks
        assert published["steps"] == sent.meta[STEPS_META] and published["epsilon"] is None  # DP off
        assert published["seconds"] > 0 and np.isfinite(published["train_loss"])
        assert sent.metrics[KEY_METRIC] == pytest.approx(
            np.mean(
                [
                    published["val"]["a_response"]["auroc"],
                    published["val"]["a_marker"]["r2"],
                    published["val"][SHARED_ENDPOINT]["c_index"],
                ]
            )
        )
    assert "test" not in first and "samples" not in first
    assert set(last["test"]) == tasks
    for metrics in last["test"].values():
        low, high = metrics["ci"]
        assert low <= high and metrics["n"] > 0
    assert not any("ci" in metrics for metrics in last["val"].values())
    assert set(last["samples"]) == {"train", "val", "test"} and sum(last["samples"].values()) == 150

    steps = {(key, step) for key, _, step in writer.logged}
    assert ("train_loss", 0) in steps and ("train_loss", 1) in steps
    assert {key for key, _, _ in writer.logged if key.startswith("val/")} >= {"val/a_response/auroc", "val/pfs/c_index"}


def test_round_one_loads_the_finalized_sum_into_the_shared_state_only(config, tmp_path, monkeypatch):
    site = MemberSite(config, "pharma-b", outputs=SiteOutputs(tmp_path / "b"))
    fake = FakeFlare(initial_model(config), site_name="pharma-b", rounds=3)
    fake.send(site.train_round(fake.receive()))
    trainer = site.trainer
    expected = {k: v.double().numpy() for k, v in site.model.shared_state().items()}
    private = {
        k: v.clone()
        for k, v in site.model.state_dict().items()
        if k.startswith("heads.b_response.") or k.endswith((".target_mean", ".target_scale"))
    }

    loaded: list[dict] = []
    load = site.model.load_shared_state

    def recording_load(state):
        load(state)
        loaded.append({"state": dict(state), "after": {k: site.model.state_dict()[k].clone() for k in private}})

    monkeypatch.setattr(site.model, "load_shared_state", recording_load)
    site.train_round(fake.receive())

    (call,) = loaded
    assert set(call["state"]) == set(expected) == _shared_keys(config)  # no stats, no private heads
    for key, value in expected.items():
        assert np.allclose(call["state"][key], value, rtol=1e-12, atol=1e-12), key  # divided back by the steps
    for key, value in private.items():  # private heads and label scaling untouched by the global model
        assert torch.equal(call["after"][key], value), key
    assert site.trainer is trainer and trainer.epochs_done == 2 * config.training.local_epochs


def test_a_member_without_shared_endpoints_sends_the_trunk_only(tiny_consortium, tmp_path):
    config = load_config(tiny_consortium)
    assert config.shared_endpoints() == []
    site = MemberSite(config, "pharma-a", outputs=SiteOutputs(tmp_path / "a"))
    sent = site.train_round(FakeFlare(initial_model(config), site_name="pharma-a", rounds=2).receive())
    model_keys = {k for k in sent.params if not k.startswith("coxfit.")}  # the covariates' Cox model: sums only
    assert model_keys == _shared_keys(config) and all(k.startswith("trunk.") for k in model_keys)


@pytest.mark.parametrize(
    "leak",
    [
        "heads.a_response.0.weight",
        f"heads.{SHARED_ENDPOINT}.target_mean",
        "heads.a_marker.target_scale",
        "optimizer.step",
    ],
)
def test_outgoing_state_refuses_a_private_key(config, monkeypatch, leak):
    net = MultitaskNet(200, [t for t in task_specs(config, "pharma-a")], seed=0)
    assert set(outgoing_state(net)) == set(net.shared_keys())
    leaky = {**net.shared_state(), leak: torch.zeros(1)}
    monkeypatch.setattr(net, "shared_state", lambda: leaky)
    with pytest.raises(PrivateStateLeak, match=rf"refusing to send \['{leak}'\]; private heads and other state never"):
        outgoing_state(net)


def test_a_leaking_site_sends_nothing(config, tmp_path, monkeypatch):
    site = MemberSite(config, "pharma-a", outputs=SiteOutputs(tmp_path / "a"))
    private_key = "heads.a_response.0.weight"
    real = site.model.shared_state
    monkeypatch.setattr(site.model, "shared_state", lambda: {**real(), private_key: torch.zeros(1)})
    fake = FakeFlare(initial_model(config), site_name="pharma-a", rounds=2)
    with pytest.raises(PrivateStateLeak, match=r"heads\.a_response\.0\.weight"):
        serve(site, fake)
    assert fake.sent == []


def test_the_site_keeps_its_final_model_and_predictions(served, config):
    site, _, _ = served
    checkpoint = torch.load(site.outputs.model_path, weights_only=False)
    assert checkpoint["member"] == "pharma-a" and len(checkpoint["feature_names"]) == site.data.n_features
    assert any(k.startswith("heads.a_response.") for k in checkpoint["state_dict"])  # private heads stay here
    net = MultitaskNet(site.data.n_features, task_specs(config, "pharma-a"), **checkpoint["network"])
    net.load_state_dict(checkpoint["state_dict"])
    predictions = read_predictions(site.outputs.folder)
    assert set(predictions["prediction"]) == set(predictions["target"]) == {"a_response", "a_marker", SHARED_ENDPOINT}
    # the fixed preprocessing it trained with, kept to score new samples: its samples scaled with it are the
    # samples it trained on, whichever others are scored with them
    scaling = read_scaling(site.outputs.folder)
    assert scaling["features"] == list(site.data.feature_names) and scaling["fitted_on"] == "train split"
    mean, scale = site.model.target_scaling("a_marker")
    assert scaling["targets"] == {"a_marker": {"mean": mean, "scale": scale}}
    scaled = scale_features(site.log_expression, mean=np.array(scaling["mean"]), std=np.array(scaling["std"]))
    scaled[:, ~np.array(scaling["measured"])] = 0.0
    np.testing.assert_allclose(scaled, site.data.X, rtol=0, atol=1e-6)


def test_dp_site_spends_epsilon_within_the_budget(config, tmp_path):
    privacy = config.privacy.model_copy(update={"dp": config.privacy.dp.model_copy(update={"enabled": True})})
    dp_config = config.model_copy(update={"privacy": privacy})
    site = MemberSite(dp_config, "pharma-b", outputs=SiteOutputs(tmp_path / "b"))
    fake = FakeFlare(initial_model(config), site_name="pharma-b", rounds=3)
    for _ in range(2):  # two of three planned rounds: the last round's attributions add nothing to test here
        fake.send(site.train_round(fake.receive()))
    epsilons = [s.meta[PUBLISHED_META]["epsilon"] for s in fake.sent]
    assert 0 < epsilons[0] < epsilons[1] <= dp_config.privacy.dp.epsilon * 1.01  # the budget covers all rounds
    model_keys = {k for k in fake.sent[0].params if not k.startswith("coxfit.")}
    assert model_keys == _shared_keys(config)  # no Opacus '_module.' keys


def test_the_last_round_publishes_timing_and_memory(served):
    _, fake, _ = served
    published = [sent.meta[PUBLISHED_META] for sent in fake.sent]
    assert published[0]["finished_at"] <= published[1]["finished_at"]
    assert all(0 < p["peak_rss_mb"] < 1e6 for p in published)
