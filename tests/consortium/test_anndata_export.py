"""A run's results as an AnnData a scanpy user opens: statistics and model scores in .var, parameters in .uns."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from consortium.anndata_export import panel_symbols, write_results_anndata
from consortium.results import Released
from models.attribution import ranking_from_vector
from schema.config import load_config
from tests.helpers import binary_statistics


@pytest.fixture
def config(tmp_path, small_config_dict):
    adata = ad.read_h5ad(tmp_path / "m.h5ad")
    adata.var["gene_symbols"] = [f"SYM{i}" for i in range(40)]
    adata.write_h5ad(tmp_path / "m.h5ad")
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(small_config_dict))
    return load_config(path)


def _released(features: list[str]) -> Released:
    rng = np.random.default_rng(0)
    n = len(features)
    table = binary_statistics(features).table
    assert set(table["feature"]) == set(features[:30])  # features no member measured are absent from a table
    statistics = {"resp": table}
    rankings = {
        "resp": ranking_from_vector(features, rng.normal(size=n)),
        "os": ranking_from_vector(features, rng.normal(size=n)),
    }
    return Released(state={}, statistics=statistics, rankings=rankings)


def test_results_open_with_anndata_and_hold_statistics_in_var(config, tmp_path):
    features = config.panel_features()
    released = _released(features)
    report = {"consortium": "tiny", "job_ids": ["a", "b"], "env": "sim", "folds": None, "privacy": {"he": True}}
    path = write_results_anndata(released, config=config, report=report, out=tmp_path)
    assert path == tmp_path / "results.h5ad"
    adata = ad.read_h5ad(path)
    assert list(adata.var_names) == features
    assert list(adata.obs_names) == ["resp", "os"] and adata.obs.loc["resp", "type"] == "binary"
    assert adata.var.loc["GENE3", "gene_symbols"] == "SYM3"
    table = released.statistics["resp"].set_index("feature")
    for column, source in (("statistic", "t"), ("effect", "logFC"), ("pvalue", "P.Value"), ("qvalue", "adj.P.Val")):
        np.testing.assert_allclose(adata.var.loc[table.index, f"resp_{column}"], table[source])
        assert np.isnan(adata.var.loc["GENE35", f"resp_{column}"])  # not measured: no value, not 0
    np.testing.assert_allclose(adata.X[0, :30], adata.var["resp_statistic"].to_numpy()[:30], rtol=1e-6)
    ranking = released.rankings["os"].set_index("feature")
    np.testing.assert_allclose(
        adata.var["os_model_score"], (ranking["score"] * ranking["direction"]).reindex(features), rtol=1e-12
    )
    assert adata.uns["parameters"]["name"] == "tiny" and "data" not in str(adata.uns["parameters"]["members"])
    assert adata.uns["run"]["env"] == "sim" and list(adata.uns["run"]["job_ids"]) == ["a", "b"]


def test_statistics_read_back_with_scanpy(config, tmp_path):
    sc = pytest.importorskip("scanpy")
    released = _released(config.panel_features())
    adata = ad.read_h5ad(write_results_anndata(released, config=config, out=tmp_path / "r.h5ad"))
    frame = sc.get.rank_genes_groups_df(adata, group="resp", key="rank_genes_groups_resp")
    expected = released.statistics["resp"].sort_values("t", ascending=False, kind="mergesort")  # scanpy's order
    assert list(frame["names"]) == list(expected["feature"])
    np.testing.assert_allclose(frame["pvals"], expected["P.Value"])
    np.testing.assert_allclose(frame["logfoldchanges"], expected["logFC"] / np.log(2), rtol=1e-6)


def test_panel_symbols_skip_files_absent_here(config):
    assert panel_symbols(config)["GENE7"] == "SYM7"
    absent = config.model_copy(
        update={"members": [config.members[0].model_copy(update={"data": config.members[0].data.with_name("x.h5ad")})]}
    )
    assert panel_symbols(absent)["GENE7"] == "GENE7"  # a symbol panel names itself
    ensembl = absent.model_copy(update={"panel": absent.panel.model_copy(update={"id_kind": "ensembl"})})
    assert isinstance(panel_symbols(ensembl), pd.Series) and panel_symbols(ensembl).empty
