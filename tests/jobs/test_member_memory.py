"""What a member site holds (``benchmarks/member_memory.py`` measures how much): its log values once, read
by the network as scaled rows equal to the matrix ``prepare_member`` scales; no optimizer state or
gradients past its last round's training; no statsmodels.api, and no scikit-survival without a survival
endpoint."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from nvflare.app_common.abstract.fl_model import FLModel

from jobs.member_data import load_member
from jobs.process_memory import return_freed_arrays, training_heap
from jobs.recipe import server_model
from jobs.site import MemberSite
from jobs.site_outputs import SiteOutputs
from models.data import ScaledRows
from models.network import SharedModel
from omics.contract import ContractRules
from omics.io import read_member
from omics.layout import MemberLayout
from omics.prepare import member_arrays, prepare_member
from schema import settings
from schema.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _member(folder: Path, *, clinical: bool = False) -> Path:
    """90 samples x 40 features of counts (the panel has 3 more, unmeasured), a binary endpoint and a
    regression endpoint with missing labels; ``clinical``: age as a model input too."""
    rng = np.random.default_rng(7)
    n, p = 90, 40
    counts = rng.poisson(6, size=(n, p)).astype(np.float32)
    counts[:, 0] += rng.poisson(15, n) * (np.arange(n) % 2)
    level = rng.normal(size=n)
    level[:9] = np.nan
    obs = pd.DataFrame(
        {"response": (np.arange(n) % 2).astype(float), "level": level, "age": rng.normal(60, 8, n)},
        index=[f"s{i}" for i in range(n)],
    )
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(p)])).write_h5ad(folder / "m.h5ad")
    panel: dict = {"features": [f"GENE{i}" for i in range(p + 3)]}
    if clinical:
        panel["clinical"] = [{"column": "age", "type": "numeric"}]
    raw = {
        "name": "memory",
        "operator": {"org": "op"},
        "panel": panel,
        "data": {"min_class_count": 5, "min_events": 5, "min_labeled": 10},
        "training": {"local_epochs": 1, "rounds": 2},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "m.h5ad",
                "tasks": [
                    {"name": "resp", "type": "binary", "column": "response"},
                    {"name": "lvl", "type": "regression", "column": "level"},
                ],
            }
        ],
    }
    (folder / "consortium.yaml").write_text(yaml.safe_dump(raw))
    return folder / "consortium.yaml"


def _scaled_matrix(config) -> np.ndarray:
    """The scaled matrix ``prepare_member`` writes (what a member's network read before it read rows)."""
    member = config.member("m1")
    prepared = prepare_member(
        read_member(member.data),
        tasks=member.tasks,
        rules=ContractRules(**settings.contract_rules(config)),
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
        layout=MemberLayout(**settings.member_layout(config, "m1")),
        path=str(member.data),
    )
    return member_arrays(prepared, tasks=member.tasks)["X"]


@pytest.mark.parametrize("clinical", [False, True], ids=["omics", "omics+clinical"])
def test_a_dense_member_holds_its_log_values_once(tmp_path, clinical):
    config = load_config(_member(tmp_path, clinical=clinical))
    loaded = load_member(config, "m1")
    X = loaded.data.X
    assert isinstance(X, ScaledRows) and isinstance(X.matrix, np.ndarray) and not loaded.data.sparse
    # the statistics' log values are the matrix the network reads (its first columns beside clinical inputs)
    assert np.shares_memory(X.matrix, loaded.log_expression)
    assert loaded.log_expression.shape == (90, 43) and X.shape == (90, 44 if clinical else 43)
    assert np.array_equal(np.asarray(X), _scaled_matrix(config))  # the very values, not close ones
    assert np.array_equal(X[loaded.data.split == "train"].dense(), _scaled_matrix(config)[loaded.data.split == "train"])


def test_the_last_round_frees_the_training_state(tmp_path):
    config = load_config(_member(tmp_path))
    site = MemberSite(config, "m1", outputs=SiteOutputs(tmp_path / "site"))
    initial = {k: v.numpy() for k, v in SharedModel(**server_model(config)["args"]).state_dict().items()}
    site.train_round(FLModel(params=dict(initial), current_round=0, total_rounds=2))
    assert site.trainer.optimizer.state  # round 1 continues from the optimizer's moments
    sent = site.train_round(FLModel(params=dict(initial), current_round=1, total_rounds=2))
    assert not site.trainer.optimizer.state
    assert all(p.grad is None for p in site.model.parameters())
    assert {"consensus.resp.score", "trunk.0.weight"} <= set(sent.params)


def test_a_member_never_loads_statsmodels_api_nor_scikit_survival_without_a_survival_endpoint(tmp_path):
    # one round is the last: it trains, takes the test figures (a binary endpoint's calibration slope:
    # statsmodels' Logit module alone), the statistics and the attribution (Captum, loaded there only)
    config_path = _member(tmp_path)
    probe = f"""
import sys
from jobs.recipe import server_model
from jobs.site import MemberSite
from jobs.site_outputs import SiteOutputs
from models.network import SharedModel
from nvflare.app_common.abstract.fl_model import FLModel
from schema.config import load_config
config = load_config({str(config_path)!r})
site = MemberSite(config, "m1", outputs=SiteOutputs({str(tmp_path / "site")!r}))
initial = {{k: v.numpy() for k, v in SharedModel(**server_model(config)["args"]).state_dict().items()}}
site.train_round(FLModel(params=initial, current_round=0, total_rounds=1))
heavy = ["sksurv"]
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m == "statsmodels.api"))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_member_process_returns_freed_arrays_except_while_training():
    assert return_freed_arrays() is True
    with training_heap():
        pass
