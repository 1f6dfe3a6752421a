import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from omics.errors import DataFileError
from omics.io import read_member, write_member
from omics.synthetic import make_consortium


def test_read_member_errors(tmp_path, small_adata):
    with pytest.raises(DataFileError, match="no such file"):
        read_member(tmp_path / "absent.h5ad")
    (tmp_path / "text.h5ad").write_text("sample,gene\n")
    with pytest.raises(DataFileError, match="not an HDF5/AnnData file"):
        read_member(tmp_path / "text.h5ad")
    good = tmp_path / "good.h5ad"
    write_member(small_adata, good)
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataFileError, match="truncated"):
        read_member(truncated)
    assert read_member(good).shape == (80, 40)


def test_synthetic_consortium_is_deterministic_and_planted(tmp_path):
    a = make_consortium(tmp_path / "a", sizes=[100, 150], n_features=200, seed=5)
    b = make_consortium(tmp_path / "b", sizes=[100, 150], n_features=200, seed=5)
    x_a, x_b = ad.read_h5ad(a.members[0].path), ad.read_h5ad(b.members[0].path)
    np.testing.assert_array_equal(x_a.X, x_b.X)
    assert a.ground_truth == b.ground_truth
    truth = json.loads(a.ground_truth_path.read_text())["tasks"]
    assert set(truth) == {"a_response", "a_marker", "a_pfs", "b_response", "b_marker", "b_pfs"}
    # shared programs drive the same kind of task at every member; specific ones differ
    assert set(truth["a_pfs"]) == set(truth["b_pfs"])
    assert set(truth["a_response"]) != set(truth["b_response"])
    assert set(truth["a_response"]) & set(truth["b_response"])
    # counts are non-negative integers with a realistic spread
    assert x_a.X.min() >= 0 and np.allclose(x_a.X, np.round(x_a.X))
    assert 10 < np.median(x_a.X.sum(axis=1)) / x_a.n_vars < 1000
    # planted genes carry signal: the response's genes correlate with it more than the others
    labels = x_a.obs["response"].to_numpy()
    rows = ~np.isnan(labels)
    logx = np.log1p(x_a.X[rows])
    corr = np.abs([np.corrcoef(logx[:, j], labels[rows])[0, 1] for j in range(x_a.n_vars)])
    planted = x_a.var_names.isin(truth["a_response"])
    assert np.nanmean(corr[planted]) > 2 * np.nanmean(corr[~planted])


def test_omics_imports_no_torch_and_no_nvflare():
    code = (
        "import sys, omics.synthetic, omics.prepare, omics.contract, omics.io;"
        "bad = [m for m in ('torch', 'nvflare') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"omics imported {result.stdout.strip()}"
