"""Reading and writing a member's AnnData file, with errors a bioinformatician can act on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd

from omics.errors import DataFileError
from omics.split import read_split_file, split_file

log = logging.getLogger(__name__)


def read_member(path: str | Path) -> ad.AnnData:
    """Read a member's ``.h5ad`` file into memory, with the split stored beside it if there is one.

    A split written by ``consortium data split`` (``<name>.split.csv``, see :func:`omics.split.split_file`)
    replaces any ``obs['split']`` of the file.

    Raises
    ------
    DataFileError
        The file is missing, not HDF5 (truncated or another format), or HDF5 without AnnData's layout;
        or the split beside it does not fit the file.
    """
    path = Path(path)
    check_member_file(path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # anndata raises many kinds for damaged files
        raise DataFileError(
            f"{path}: unreadable AnnData file ({type(exc).__name__}: {exc}); the file may be truncated, re-export it"
        ) from None
    log.info("read %s: %d samples x %d features", path, adata.n_obs, adata.n_vars)
    stored = read_stored_split(path, adata.obs_names)
    if stored is not None:
        adata.obs["split"] = stored
        adata.uns["split_file"] = str(split_file(path))
    return adata


def read_stored_split(path: str | Path, obs_names) -> pd.Categorical | None:
    """The split stored beside the member's file (``<name>.split.csv``), for ``obs_names``; ``None`` without one."""
    stored = split_file(Path(path))
    if not stored.is_file():
        return None
    log.info("read the split stored beside it: %s", stored)
    return read_split_file(stored, obs_names)


def check_member_file(path: str | Path) -> None:
    """Raise :class:`DataFileError` unless ``path`` is an HDF5 file with AnnData's ``X``, ``obs`` and ``var``."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file; check the member's 'data' path in consortium.yaml")
    if path.is_dir():
        raise DataFileError(f"{path}: is a folder; 'data' must point at the member's .h5ad file")
    if not h5py.is_hdf5(path):
        raise DataFileError(
            f"{path}: not an HDF5/AnnData file (truncated or another format); "
            "re-export it with anndata's `adata.write_h5ad(path)`"
        )
    try:
        with h5py.File(path, "r") as handle:
            missing = [key for key in ("X", "obs", "var") if key not in handle]
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open the HDF5 file ({exc}); the file may be truncated") from None
    if missing:
        raise DataFileError(
            f"{path}: HDF5 file without AnnData's {', '.join(missing)}; "
            "write the member data with anndata's `adata.write_h5ad(path)`"
        )


def write_member(adata: ad.AnnData, path: str | Path) -> None:
    """Write ``adata`` atomically: a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        adata.write_h5ad(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
