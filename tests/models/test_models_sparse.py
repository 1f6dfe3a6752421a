"""A sparse member (ScaledRows: CSR log values scaled as rows are read) trains, predicts and is attributed
as the same member given dense: the same model to float32 arithmetic, never the whole matrix made dense."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import models.data
from models.attribution import attributions, rank_features
from models.data import MemberData, ScaledRows, TaskSpec, dense_rows
from models.network import MultitaskNet
from models.privacy import PrivacySettings
from models.training import LocalTrainer, TrainSettings

N, P = 240, 30


def _members() -> tuple[MemberData, MemberData, list[TaskSpec]]:
    """One member as ScaledRows over a 25%-dense CSR matrix and as the dense array of the same rows."""
    rng = np.random.default_rng(5)
    logs = np.log1p(rng.poisson(3, size=(N, P))).astype(np.float32)
    logs[rng.random((N, P)) < 0.75] = 0.0
    mean = logs[: N // 2].mean(axis=0, dtype=np.float64)
    std = logs[: N // 2].std(axis=0, ddof=1, dtype=np.float64)
    std[4] = 0.0  # a constant feature: centred, not divided by 0
    rows = ScaledRows(sp.csr_matrix(logs), mean=mean, std=std, max_value=3.0)
    dense = rows.dense()
    signal = dense[:, 0] - dense[:, 1] + 0.5 * dense[:, 2]
    targets = {
        "resp": (signal + 0.3 * rng.normal(size=N) > 0).astype(np.float64),
        "level": 2.0 * signal + 5.0 + 0.2 * rng.normal(size=N),
        "os": np.c_[np.exp(-signal + 0.3 * rng.normal(size=N)), (rng.random(N) < 0.8).astype(np.float64)],
    }
    split = np.array(["train", "train", "train", "val", "test"] * (N // 5))
    tasks = [TaskSpec("resp", "binary"), TaskSpec("level", "regression"), TaskSpec("os", "survival")]
    names = [f"f{i}" for i in range(P)]
    sparse_member = MemberData(X=rows, targets=targets, split=split, feature_names=names)
    dense_member = MemberData(
        X=dense, targets={k: v.copy() for k, v in targets.items()}, split=split, feature_names=names
    )
    return dense_member, sparse_member, tasks


def test_scaled_rows_are_the_dense_scaling_and_subsets_are_views():
    logs = sp.csr_matrix(np.array([[0.0, 2.0, 9.0], [4.0, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=np.float32))
    rows = ScaledRows(logs, mean=[2.0, 1.0, 0.0], std=[2.0, 1.0, 0.0], max_value=5.0)
    expected = np.array([[-1.0, 1.0, 5.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(rows.dense(), expected)
    np.testing.assert_array_equal(np.asarray(rows), expected)
    member = MemberData(X=rows, targets={}, split=np.array(["train", "test", "train"]))
    train = member.subset("train")
    assert train.sparse and train.X.matrix is logs and train.X.shape == (2, 3)  # a view of the same CSR
    np.testing.assert_array_equal(dense_rows(train.X, [1]), expected[[2]])
    np.testing.assert_array_equal(np.concatenate(list(rows.blocks(2))), expected)


def _trained(data: MemberData, tasks, *, privacy=None) -> LocalTrainer:
    model = MultitaskNet(data.n_features, tasks, trunk_widths=(16, 8), head_width=8, dropout=0.1, seed=3)
    settings = TrainSettings(epochs=3, batch_size=32, learning_rate=1e-2, seed=1)
    trainer = LocalTrainer(model, data, tasks, settings=settings, privacy=privacy, planned_epochs=3)
    trainer.train()
    return trainer


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_a_sparse_member_trains_to_the_dense_members_model(private):
    dense, sparse, tasks = _members()
    privacy = PrivacySettings(epsilon=5.0, delta=1e-4) if private else None
    a, b = _trained(dense, tasks, privacy=privacy), _trained(sparse, tasks, privacy=privacy)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert a.validation_loss() == pytest.approx(b.validation_loss(), rel=1e-6)
    for part in ("val", "test"):
        expected, got = a.evaluate(part), b.evaluate(part)
        for task in tasks:
            for metric, value in expected[task.name].items():
                assert got[task.name][metric] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), metric
    predicted = b.model.predict(sparse.X, batch_size=50)  # in blocks of scaled rows
    for name, value in a.model.predict(dense.X).items():
        np.testing.assert_allclose(predicted[name], value, rtol=1e-6, atol=1e-6)


def test_a_sparse_member_is_attributed_in_blocks_as_the_dense_member(monkeypatch):
    dense, sparse, tasks = _members()
    model = _trained(dense, tasks).model
    train_dense, train_sparse = dense.subset("train"), sparse.subset("train")
    np.testing.assert_allclose(
        attributions(model, train_sparse.X, "resp", n_steps=8),
        attributions(model, train_dense.X, "resp", n_steps=8),
        rtol=1e-5,
        atol=1e-7,
    )
    whole = ScaledRows.dense
    read: list[int] = []

    def counted(self, positions=None):
        out = whole(self, positions)
        read.append(out.shape[0])
        return out

    monkeypatch.setattr(ScaledRows, "dense", counted)
    monkeypatch.setattr(models.data, "ROW_BLOCK", 32)
    options = dict(feature_names=dense.feature_names, n_boot=5, n_steps=8, max_per_group=20, seed=2)
    got = rank_features(model, train_sparse.X, "resp", labels=train_sparse.targets["resp"], **options)
    monkeypatch.setattr(ScaledRows, "dense", whole)
    expected = rank_features(model, train_dense.X, "resp", labels=train_dense.targets["resp"], **options)
    assert list(got["feature"]) == list(expected["feature"])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5, atol=1e-8)
    assert max(read) <= 40 < len(train_sparse.X)  # the bounded rows and blocks, never the whole split at once
    assert sum(read) == 2 * len(train_sparse.X) + 40  # predictions and the mean in blocks, then 2 x 20 rows
