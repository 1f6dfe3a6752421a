"""A member read from its file a block of rows at a time (``members[].read: chunks``) gives what the same
member read into memory gives: the same scaled rows bit for bit, the same normalization, the same
statistics to 1e-9 and the same trained model; dense and CSR files alike. Damaged files get errors that
name them."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

import omics.chunked
from jobs.member_data import load_member, scaling_pieces, task_specs
from jobs.site_statistics import SiteStatistics
from models.network import MultitaskNet
from models.training import LocalTrainer, TrainSettings
from omics.chunked import ChunkedRows, H5Matrix, chunked_read
from omics.errors import DataFileError
from schema.config import load_config

N, P = 160, 50


def _write_member(folder: Path, *, sparse: bool, clinical: bool = False, read: str = "memory") -> Path:
    """160 samples x 50 features of counts, ~60% zeros (one empty sample, one empty feature), a binary, a
    regression (labels missing) and a survival endpoint; the panel drops 4 features and adds 3 unmeasured."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(5, size=(N, P)).astype(np.float32)
    counts[:, 0] += rng.poisson(12, N) * (np.arange(N) % 2)
    counts[rng.random((N, P)) < 0.6] = 0.0
    counts[5], counts[:, 9] = 0.0, 0.0
    level = rng.normal(size=N) + 0.1 * counts[:, 1]
    level[:11] = np.nan
    obs = pd.DataFrame(
        {
            "response": (np.arange(N) % 2).astype(float),
            "level": level,
            "age": rng.normal(60, 8, N),
            "os_time": rng.exponential(20, N) + 1.0,
            "os_event": (rng.random(N) < 0.7).astype(float),
        },
        index=[f"s{i}" for i in range(N)],
    )
    X = sp.csr_matrix(counts) if sparse else counts
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(P)])).write_h5ad(folder / "m.h5ad")
    panel: dict = {"features": [f"GENE{i}" for i in range(4, P)] + ["EXTRA1", "EXTRA2", "EXTRA3"]}
    if clinical:
        panel["clinical"] = [{"column": "age", "type": "numeric"}]
    raw = {
        "name": "chunked",
        "operator": {"org": "op"},
        "panel": panel,
        "data": {"min_class_count": 5, "min_events": 5, "min_labeled": 10},
        "statistics": {"covariates": {"age": "numeric"}} if not clinical else {},
        "training": {"local_epochs": 1, "rounds": 2},
        "members": [
            {
                "name": "m1",
                "org": "Org_One",
                "data": "m.h5ad",
                "read": read,
                "tasks": [
                    {"name": "resp", "type": "binary", "column": "response"},
                    {"name": "lvl", "type": "regression", "column": "level"},
                    {"name": "os", "type": "survival", "time": "os_time", "event": "os_event"},
                ],
            }
        ],
    }
    (folder / "consortium.yaml").write_text(yaml.safe_dump(raw))
    return folder / "consortium.yaml"


def _loaded(tmp_path: Path, *, sparse: bool, read: str, clinical: bool = False):
    folder = tmp_path / f"{'csr' if sparse else 'dense'}-{read}"
    folder.mkdir()
    config = load_config(_write_member(folder, sparse=sparse, clinical=clinical, read=read))
    return config, load_member(config, "m1")


@pytest.fixture(autouse=True)
def _small_reads(monkeypatch):
    monkeypatch.setattr(omics.chunked, "VALUES_PER_READ", 600)  # several blocks per pass (~30-50 rows)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("clinical", [False, True], ids=["omics", "omics+clinical"])
def test_chunked_rows_and_normalization_are_the_in_memory_ones(tmp_path, sparse, clinical):
    _, memory = _loaded(tmp_path, sparse=sparse, read="memory", clinical=clinical)
    _, chunks = _loaded(tmp_path, sparse=sparse, read="chunks", clinical=clinical)
    assert isinstance(chunks.data.X.matrix, ChunkedRows) and chunks.data.sparse
    assert chunks.data.X.shape == memory.data.X.shape and chunks.data.feature_names == memory.data.feature_names
    for key in ("mean", "std", "measured", "features", "values", "fitted_on"):
        assert chunks.scaling[key] == memory.scaling[key], key  # float32 lists: the very values
    np.testing.assert_array_equal(chunks.data.split, memory.data.split)
    np.testing.assert_array_equal(chunks.measured, memory.measured)
    np.testing.assert_array_equal(chunks.data.X.dense(), memory.data.X.dense())  # bit for bit
    order = np.random.default_rng(0).permutation(N)[:70]  # a minibatch: rows in any order, runs and gaps
    np.testing.assert_array_equal(chunks.data.X.dense(order), memory.data.X.dense(order))
    train_chunks, train_memory = chunks.data.subset("train"), memory.data.subset("train")
    for a, b in zip(train_chunks.X.blocks(40), train_memory.X.blocks(40), strict=True):
        np.testing.assert_array_equal(a, b)
    assert chunks.data.X.all_finite()
    for name, values in memory.data.targets.items():
        np.testing.assert_array_equal(chunks.data.targets[name], values)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_chunked_statistics_equal_the_in_memory_ones_to_1e9(tmp_path, sparse):
    config, memory = _loaded(tmp_path, sparse=sparse, read="memory")
    _, chunks = _loaded(tmp_path, sparse=sparse, read="chunks")
    expected = SiteStatistics(config, "m1", memory.statistics).sections()
    got = SiteStatistics(config, "m1", chunks.statistics).sections()
    assert sorted(got) == sorted(expected) and any(key.startswith("stats.os.") for key in got)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-9, err_msg=key)
    options = dict(tasks=[], minimum=5)
    expected = scaling_pieces(memory.data, memory.log_expression, memory.measured, **options)
    got = scaling_pieces(chunks.data, chunks.log_expression, chunks.measured, **options)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-9, err_msg=key)


def test_dense_and_csr_files_read_in_chunks_give_the_same_statistics(tmp_path):
    config, dense = _loaded(tmp_path, sparse=False, read="chunks")
    _, csr = _loaded(tmp_path, sparse=True, read="chunks")
    np.testing.assert_array_equal(dense.data.X.dense(), csr.data.X.dense())
    expected = SiteStatistics(config, "m1", dense.statistics).sections()
    for key, value in SiteStatistics(config, "m1", csr.statistics).sections().items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_a_member_read_in_chunks_trains_to_the_in_memory_model(tmp_path):
    config, memory = _loaded(tmp_path, sparse=True, read="memory")
    _, chunks = _loaded(tmp_path, sparse=True, read="chunks")
    tasks = task_specs(config, "m1")

    def trained(data):
        model = MultitaskNet(data.n_features, tasks, trunk_widths=(16, 8), head_width=8, dropout=0.1, seed=3)
        settings = TrainSettings(epochs=2, batch_size=32, learning_rate=1e-2, seed=1)
        trainer = LocalTrainer(model, data, tasks, settings=settings, planned_epochs=2)
        trainer.train()
        return trainer

    a, b = trained(memory.data), trained(chunks.data)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    predicted = b.model.predict(chunks.data.X, batch_size=50)
    for name, value in a.model.predict(memory.data.X, batch_size=50).items():
        np.testing.assert_allclose(predicted[name], value, rtol=1e-6, atol=1e-6)


def test_the_reader_restores_the_order_asked_for(tmp_path):
    X = sp.random(40, 7, density=0.4, format="csr", dtype=np.float32, random_state=1)
    X.data = np.ceil(X.data * 9)
    ad.AnnData(X=X).write_h5ad(tmp_path / "m.h5ad")
    reader = ChunkedRows(H5Matrix(tmp_path / "m.h5ad"), columns=np.array([6, -1, 0, 3]), values="normalized")
    rows = np.array([39, 2, 3, 2, 17, 0])
    expected = np.c_[X[rows][:, 6].toarray(), np.zeros(6), X[rows][:, [0, 3]].toarray()]
    np.testing.assert_array_equal(reader[rows].toarray(), expected)
    np.testing.assert_array_equal(reader.take(rows).csr().toarray(), expected)
    assert reader.shape == (40, 4) and reader.take(slice(5, 9)).shape == (4, 4)


def test_a_truncated_file_is_named(tmp_path):
    config = load_config(_write_member(tmp_path, sparse=True, read="chunks"))
    path = tmp_path / "m.h5ad"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=str(path)):
        load_member(config, "m1")


def test_a_matrix_that_is_not_2d_is_named(tmp_path):
    path = tmp_path / "m.h5ad"
    ad.AnnData(X=np.ones((4, 3), dtype=np.float32)).write_h5ad(path)
    with h5py.File(path, "r+") as handle:
        del handle["X"]
        handle["X"] = np.ones(12, dtype=np.float32)
    with pytest.raises(DataFileError, match=rf"{path}: 'X' has shape \(12,\), not 2-D"):
        H5Matrix(path)


def test_auto_reads_in_chunks_only_past_the_memory_budget(tmp_path, monkeypatch, caplog):
    _write_member(tmp_path, sparse=True)
    path = tmp_path / "m.h5ad"
    assert not chunked_read(path, read="auto")
    monkeypatch.setattr(omics.chunked, "available_memory", lambda: 1000)
    with caplog.at_level("INFO", logger="omics.chunked"):
        assert chunked_read(path, read="auto", member="m1")
    assert "read in chunks" in caplog.text and "m1" in caplog.text
    assert not chunked_read(path, read="memory") and chunked_read(path, read="chunks")


def test_read_is_checked_by_the_config(tmp_path):
    _write_member(tmp_path, sparse=True)
    raw = yaml.safe_load((tmp_path / "consortium.yaml").read_text())
    raw["members"][0]["read"] = "lazily"
    (tmp_path / "consortium.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="auto.*memory.*chunks"):
        load_config(tmp_path / "consortium.yaml")
    raw["members"][0].update(read="chunks", sample_column="donor")
    (tmp_path / "consortium.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="read: chunks is not supported with sample_column"):
        load_config(tmp_path / "consortium.yaml")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_data_check_in_chunks_finds_what_it_finds_in_memory(tmp_path, sparse):
    from consortium.commands.data import check_member_data

    reports = {}
    for read in ("memory", "chunks"):
        folder = tmp_path / read
        folder.mkdir()
        config = load_config(_write_member(folder, sparse=sparse, read=read))
        adata = ad.read_h5ad(folder / "m.h5ad")
        X = adata.X.toarray() if sparse else adata.X
        X[3, 7], X[100, 2], X[150, 40] = np.nan, -2.0, 1.5  # non-finite, negative, not whole
        adata.X = sp.csr_matrix(X) if sparse else X
        adata.write_h5ad(folder / "m.h5ad")
        reports[read] = check_member_data(config, "m1")
    assert not reports["chunks"].fit
    assert reports["chunks"].findings == reports["memory"].findings
    assert any("1 NaN and 0 infinite" in f.message for f in reports["chunks"].findings)
    assert reports["chunks"].layout["read"] == "in chunks" and "read" not in reports["memory"].layout


@pytest.mark.parametrize("layer", ["counts", "raw"])
def test_a_layer_or_raw_is_read_in_chunks_as_in_memory(tmp_path, layer):
    loaded = {}
    for read in ("memory", "chunks"):
        folder = tmp_path / read
        folder.mkdir()
        path = _write_member(folder, sparse=True, read=read)
        adata = ad.read_h5ad(folder / "m.h5ad")
        if layer == "raw":
            adata.raw = adata.copy()
        else:
            adata.layers["counts"] = adata.X.copy()
        adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()) + 0.5)  # not counts: the layout must not read it
        adata.write_h5ad(folder / "m.h5ad")
        raw = yaml.safe_load(path.read_text())
        raw["members"][0]["layer"] = layer
        path.write_text(yaml.safe_dump(raw))
        loaded[read] = load_member(load_config(path), "m1")
    assert isinstance(loaded["chunks"].data.X.matrix, ChunkedRows)
    np.testing.assert_array_equal(loaded["chunks"].data.X.dense(), loaded["memory"].data.X.dense())
    assert loaded["chunks"].scaling["mean"] == loaded["memory"].scaling["mean"]
