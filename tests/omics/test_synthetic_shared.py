"""The synthetic consortium with shared endpoints (the demo's): one name at every member, the same data."""

from __future__ import annotations

import pytest

from omics.io import read_member
from omics.synthetic import make_consortium


def test_shared_endpoints_carry_one_name_and_the_union_of_planted_features(tmp_path):
    plain = make_consortium(tmp_path / "plain", sizes=[100, 150], n_features=200, seed=5)
    shared = make_consortium(tmp_path / "shared", sizes=[100, 150], n_features=200, seed=5, shared=("marker", "pfs"))
    assert [[t["name"] for t in m.tasks] for m in shared.members] == [
        ["a_response", "marker", "pfs"],
        ["b_response", "marker", "pfs"],
    ]
    truth = plain.ground_truth
    assert shared.ground_truth["marker"] == list(dict.fromkeys(truth["a_marker"] + truth["b_marker"]))
    assert shared.ground_truth["pfs"] == truth["a_pfs"] == truth["b_pfs"]
    assert shared.ground_truth["a_response"] == truth["a_response"]
    for a, b in zip(plain.members, shared.members, strict=True):  # the same samples and labels
        x, y = read_member(a.path), read_member(b.path)
        assert (x.X != y.X).nnz == 0 if hasattr(x.X, "nnz") else (x.X == y.X).all()
        assert x.obs.equals(y.obs)
    with pytest.raises(ValueError, match=r"unknown endpoint\(s\) \['os'\]"):
        make_consortium(tmp_path / "bad", sizes=[100], n_features=200, shared=("os",))
