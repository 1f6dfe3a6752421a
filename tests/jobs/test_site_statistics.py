"""One small-cell rule for everything a member sends (statistics, Cox pieces, attribution, figures), and the
samples of a single-cell member's statistics are its donors, not its cells (pseudobulk)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from nvflare.app_common.abstract.fl_model import FLModel

from jobs.member_data import load_member
from jobs.sections import PUBLISHED_META
from jobs.site import MemberSite
from jobs.site_outputs import SiteOutputs
from jobs.site_statistics import SiteStatistics
from omics.design import DesignSpec
from omics.statistics import endpoint_statistics
from schema import settings
from schema.config import load_config


def _config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_member_with_two_positives_sends_nothing_for_that_endpoint(tmp_path, small_config_dict, small_adata):
    small_adata.obs["response"] = 0.0
    small_adata.obs.iloc[:2, small_adata.obs.columns.get_loc("response")] = 1.0  # two positives
    small_adata.write_h5ad(tmp_path / "m.h5ad")
    raw = dict(small_config_dict, data={"min_class_count": 1, "min_events": 5, "min_labeled": 10})
    config = load_config(_config(tmp_path, raw))
    site = MemberSite(config, "m1", outputs=SiteOutputs(tmp_path / "site"), statistics_only=True)
    sent = site.train_round(FLModel(params={}, current_round=0, total_rounds=1))
    endpoints = {key.split(".")[1] for key in sent.params}
    assert "resp" not in endpoints and {"lvl", "os"} <= endpoints
    published = sent.meta[PUBLISHED_META]
    assert published["small_cell"] == ["resp"]
    assert site.statistics.sends("lvl") and not site.statistics.sends("resp")


def _single_cell_member(tmp_path: Path, *, donors: int = 6, cells: int = 30) -> None:
    rng = np.random.default_rng(0)
    n, p = donors * cells, 40
    counts = sp.random(n, p, density=0.3, random_state=1, data_rvs=lambda k: rng.integers(1, 20, k)).tocsr()
    donor = np.repeat([f"d{i}" for i in range(donors)], cells)
    status = np.repeat(np.arange(donors) % 2, cells).astype(float)
    obs = pd.DataFrame(
        {"donor": donor, "status": status, "age": np.repeat(rng.normal(60, 8, donors).round(), cells)},
        index=[f"c{i}" for i in range(n)],
    )
    obs["cell_type"] = rng.choice(["B", "T"], n)
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(p)]))
    adata.write_h5ad(tmp_path / "sc.h5ad")


def test_a_pseudobulk_members_statistics_count_donors_not_cells(tmp_path):
    _single_cell_member(tmp_path)
    raw = {
        "name": "sc",
        "operator": {"org": "op"},
        "panel": {"features": [f"GENE{i}" for i in range(40)]},
        "data": {"min_class_count": 5, "min_labeled": 10, "min_cell_count": 3},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "sc.h5ad",
                "sample_column": "donor",
                "tasks": [{"name": "status", "type": "binary", "column": "status"}],
            }
        ],
        "statistics": {"covariates": {"age": "numeric"}},
    }
    config = load_config(_config(tmp_path, raw))
    loaded = load_member(config, "m1")
    assert len(loaded.data.X) == 180 and len(loaded.statistics.obs) == 6 and loaded.statistics.pseudobulk
    site = SiteStatistics(config, "m1", loaded.statistics)
    pieces = {key.split(".", 2)[2]: value for key, value in site.sections().items()}
    released = endpoint_statistics(
        pieces,
        spec=DesignSpec(**settings.design_spec(config)),
        feature_names=config.panel_features(),
        **settings.statistics_release(config, "status"),
    )
    assert set(released.table["samples"]) == {6}  # donors, not the 180 cells
    # the same member below the rule on donors (3 per class < 4), whatever its 90 cells per class
    strict = load_config(_config(tmp_path, dict(raw, data={**raw["data"], "min_cell_count": 4})))
    assert SiteStatistics(strict, "m1", load_member(strict, "m1").statistics).withheld == ["status"]


def test_the_cox_fit_is_kept_with_the_checkpoint_and_a_continuing_site_steps_from_it(tmp_path, small_config_dict):
    raw = dict(small_config_dict, statistics={"covariates": {"level": "numeric"}})
    raw["members"][0]["tasks"] = [t for t in raw["members"][0]["tasks"] if t["name"] == "os"]
    config = load_config(_config(tmp_path, raw))
    loaded = load_member(config, "m1")
    first = SiteStatistics(config, "m1", loaded.statistics)
    pieces = {key.split(".", 2)[2]: value for key, value in first.cox_sections().items()}
    first.absorb({f"coxfit.os.{key}": value for key, value in pieces.items()})  # one member: its sum is its own
    assert first.cox_steps == {"os": 1} and abs(first.cox_beta["os"][0]) > 0
    continuing = SiteStatistics(config, "m1", loaded.statistics)
    continuing.load_state(first.state())
    np.testing.assert_array_equal(continuing.cox_beta["os"], first.cox_beta["os"])
    assert continuing.cox_steps == {"os": 1}


def test_member_weights_converge_over_rounds_and_equal_weighted_limma(tmp_path):
    """statistics.member_weights: each round the members' summed pieces give each member its next weight;
    the released table equals pylimma's weighted fit with those weights (a noisier platform counts less)."""
    pylimma = pytest.importorskip("pylimma")
    rng = np.random.default_rng(3)
    p, members = 60, []
    for index, (n, noise) in enumerate([(60, 1.0), (50, 1.0), (40, 3.0)]):
        counts = rng.poisson(rng.uniform(20, 200, p), size=(n, p)).astype(np.float32)
        counts *= np.exp(rng.normal(0, 0.3 * noise, size=(n, p))).astype(np.float32)
        obs = pd.DataFrame({"level": rng.normal(size=n), "age": rng.normal(60, 8, n).round()})
        adata = ad.AnnData(
            X=np.round(counts),
            obs=obs.set_axis([f"s{index}_{i}" for i in range(n)]),
            var=pd.DataFrame(index=[f"GENE{i}" for i in range(p)]),
        )
        adata.write_h5ad(tmp_path / f"m{index}.h5ad")
        members.append(
            {
                "name": f"m{index}",
                "org": f"Org_{index}",
                "data": f"m{index}.h5ad",
                "tasks": [{"name": "lvl", "type": "regression", "column": "level"}],
            }
        )
    raw = {
        "name": "w",
        "operator": {"org": "op"},
        "panel": {"features": [f"GENE{i}" for i in range(p)]},
        "data": {"min_labeled": 10},
        "members": members,
        "statistics": {"covariates": {"age": "numeric"}, "member_weights": True},
    }
    config = load_config(_config(tmp_path, raw))
    assert settings.statistics_rounds(config) == 4
    loaded = [load_member(config, m["name"]) for m in members]
    sites = [SiteStatistics(config, m["name"], one.statistics) for m, one in zip(members, loaded, strict=True)]
    rounds = settings.statistics_rounds(config)
    for round_ in range(rounds):  # as the stats job: every round sends, the members step on the sum
        weights = np.array([site.weights["lvl"] for site in sites])  # what this round's pieces carry
        sent = [site.sections() for site in sites]
        summed = {key: np.sum([s[key] for s in sent], axis=0) for key in sent[0]}
        if round_ + 1 < rounds:
            for site in sites:
                site.absorb(summed)
    assert weights[2] / weights[0] < 0.3 and all(site.weight_steps == {"lvl": rounds - 1} for site in sites)
    pieces = {key.split(".", 2)[2]: value for key, value in summed.items()}
    released = endpoint_statistics(
        pieces,
        spec=DesignSpec(**settings.design_spec(config)),
        feature_names=config.panel_features(),
        **settings.statistics_release(config, "lvl"),
    ).table.set_index("feature")
    # the reference: pooled limma with member as a factor and each member's weight on its samples
    Y = np.vstack([one.statistics.log_expression for one in loaded])
    member = np.concatenate([np.full(len(one.statistics.obs), i) for i, one in enumerate(loaded)])
    obs = pd.concat([one.statistics.obs for one in loaded])
    design = np.column_stack([np.ones(len(obs)), member == 1, member == 2, obs["level"], obs["age"]]).astype(float)
    ref = pylimma.e_bayes(pylimma.lm_fit(Y.T, design, weights=np.tile(weights[member], (p, 1))), legacy=True)
    theirs = pylimma.top_table(ref, coef=3, number=np.inf, sort_by="none")
    theirs.index = config.panel_features()
    theirs = theirs.loc[released.index]
    np.testing.assert_allclose(released["t"], theirs["t"], rtol=1e-6)
    np.testing.assert_allclose(released["P.Value"], theirs["p_value"], rtol=1e-6, atol=1e-300)
