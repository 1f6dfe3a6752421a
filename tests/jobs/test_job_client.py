"""The Client API script ``jobs/client.py`` with a fake ``nvflare.client``: wiring, paths and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from jobs import client
from jobs.recipe import server_model
from jobs.sections import PUBLISHED_META
from models.network import SharedModel
from schema.config import load_config
from schema.errors import ConfigError
from schema.names import CONFIG_ENV, OUTPUTS_ENV


class OneRoundFlare:
    """``nvflare.client`` for a one-round job: hands out the server's initial model once, keeps what is sent."""

    def __init__(self, initial: dict[str, np.ndarray], *, site_name: str) -> None:
        self.initial, self.site_name = initial, site_name
        self.sent: list[FLModel] = []
        self.initialized = False
        self.done = False

    def init(self, *args, **kwargs) -> None:
        self.initialized = True

    def get_site_name(self) -> str:
        return self.site_name

    def get_job_id(self) -> str:
        return "job-7"

    def is_running(self) -> bool:
        return not self.done

    def receive(self, timeout=None) -> FLModel | None:
        if self.done:
            return None  # the job is over: the real Client API returns None at once
        self.done = True
        return FLModel(params=dict(self.initial), current_round=0, total_rounds=1)

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        self.sent.append(model)


class RecordingWriter:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int | None]] = []

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.logged.append((key, value, step))


def _initial(config) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in SharedModel(**server_model(config)["args"]).state_dict().items()}


def test_main_serves_the_member_named_by_flare(shared_consortium: Path, tmp_path: Path, monkeypatch):
    config = load_config(shared_consortium)
    fake, writer = OneRoundFlare(_initial(config), site_name="pharma-b"), RecordingWriter()
    monkeypatch.setattr(client, "flare", fake)
    monkeypatch.setattr(client, "MLflowWriter", lambda: writer)
    client.main(["--config", str(shared_consortium), "--outputs", str(tmp_path / "sites")])

    assert fake.initialized
    (sent,) = fake.sent
    published = sent.meta[PUBLISHED_META]
    assert set(published["test"]) == {"b_response", "b_marker", "pfs"}  # one round is also the last
    assert not [k for k in sent.params if k.startswith(("heads.b_response.", "heads.b_marker."))]
    assert (tmp_path / "sites" / "pharma-b" / "model.pt").exists()
    assert (tmp_path / "sites" / "pharma-b" / "predictions.npz").exists()
    assert ("train_loss", 0) in {(key, step) for key, _, step in writer.logged}


def test_paths_come_from_arguments_environment_or_workspace(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(OUTPUTS_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"no consortium.yaml for this site: set {CONFIG_ENV}"):
        client.config_path(None)
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "c.yaml"))
    assert client.config_path(None) == tmp_path / "c.yaml"
    assert client.config_path(Path("x.yaml")) == Path("x.yaml")

    monkeypatch.chdir(tmp_path)
    assert client.outputs_root(None, job_id="j1") == tmp_path / "consortium_outputs" / "j1"
    monkeypatch.setenv(OUTPUTS_ENV, str(tmp_path / "site-out"))
    assert client.outputs_root(None, job_id="j1") == tmp_path / "site-out"
    assert client.outputs_root(tmp_path / "given", job_id="j1") == tmp_path / "given"
    assert client.parse_args(["--fold", "2"]).fold == 2


def test_a_site_that_is_no_member_is_refused(tiny_consortium: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(client, "flare", OneRoundFlare({}, site_name="site-1"))
    with pytest.raises(ConfigError, match="no member 'site-1'; members are: pharma-a, pharma-b"):
        client.main(["--config", str(tiny_consortium), "--outputs", str(tmp_path)])
