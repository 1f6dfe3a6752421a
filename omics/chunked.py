"""A member's matrix read from its ``.h5ad`` file a block of rows at a time, never whole.

:class:`ChunkedRows` serves the log values of a member whose matrix does not fit in memory: each read
takes rows from the file (a CSR group ``data/indices/indptr`` or a dense 2-D dataset), applies library
size + ``log1p`` with :func:`omics.normalize.log_values`' float32 arithmetic, and puts the columns in
panel order. What it returns is a CSR block, so a reader stands wherever a member's CSR log values do:
as the matrix of ``models.data.ScaledRows`` (minibatches, predictions, attribution), and in the passes
over row blocks that the normalization's mean/SD and the statistics' sums make.

:func:`chunked_read` decides whether a member is read so (``members[].read`` in consortium.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from omics.errors import DataFileError

log = logging.getLogger(__name__)

VALUES_PER_READ = 2**21  # stored values a pass reads from the file at a time (its temporaries: ~100 MB)
_GAP = 32  # rows between two wanted runs read (and dropped) rather than read apart
MEMORY_SHARE = 0.5  # read: auto reads in chunks when X in memory would need more than this share of MemAvailable
_COPIES = 2.5  # in memory, a matrix is held about this many times over while it is normalized


class H5Matrix:
    """One matrix of a member's file (``X``, ``layers/<key>``, ``raw/X``) as stored, read by rows."""

    def __init__(self, path: str | Path, *, group: str = "X") -> None:
        self.path, self.group = Path(path), group
        self._handle: h5py.File | None = None
        self._nodes: dict[str, h5py.Dataset] = {}
        try:
            node = self._file()[group]
        except KeyError:
            raise DataFileError(f"{self.path}: no matrix '{group}' in the file; re-export it with anndata") from None
        except OSError as exc:
            raise DataFileError(f"{self.path}: cannot read '{group}' ({exc}); the file may be truncated") from None
        if isinstance(node, h5py.Group):
            missing = [key for key in ("data", "indices", "indptr") if key not in node]
            encoding = str(node.attrs.get("encoding-type", "csr_matrix"))
            if missing or encoding != "csr_matrix":
                raise DataFileError(
                    f"{self.path}: '{group}' is {encoding} {'without ' + ', '.join(missing) if missing else ''}; "
                    "chunked reading needs a CSR matrix or a dense 2-D array: re-export it as CSR "
                    "(adata.X = scipy.sparse.csr_matrix(adata.X))"
                )
            self.sparse = True
            self.shape = tuple(int(v) for v in node.attrs["shape"])
            self.dtype = node["data"].dtype
            self.indptr = np.asarray(node["indptr"][:], dtype=np.int64)  # n + 1 offsets: small
            if self.indptr.shape != (self.shape[0] + 1,) or self.indptr[-1] > node["data"].shape[0]:
                raise DataFileError(f"{self.path}: '{group}' has inconsistent CSR arrays; the file may be truncated")
        else:
            if node.ndim != 2:
                raise DataFileError(
                    f"{self.path}: '{group}' has shape {node.shape}, not 2-D (samples x features); "
                    "store the matrix as samples x features"
                )
            self.sparse, self.shape, self.dtype, self.indptr = (
                False,
                tuple(int(v) for v in node.shape),
                node.dtype,
                None,
            )

    def _node(self, name: str | None = None) -> h5py.Dataset:
        """The matrix's dataset (a dense matrix) or its ``name`` dataset (a CSR group's), looked up once."""
        key = name or ""
        if key not in self._nodes:
            group = self._file()[self.group]
            self._nodes[key] = group if name is None else group[name]
        return self._nodes[key]

    def _file(self) -> h5py.File:
        if self._handle is None:
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataFileError(
                    f"{self.path}: cannot open the HDF5 file ({exc}); the file may be truncated"
                ) from None
        return self._handle

    def __getstate__(self) -> dict:  # an open HDF5 handle does not pickle: reopened on the next read
        return {**self.__dict__, "_handle": None, "_nodes": {}}

    @property
    def nbytes(self) -> int:
        """The matrix's size in memory as stored (values, and a CSR's column indices and offsets)."""
        if self.sparse:
            nnz = int(self.indptr[-1])
            return nnz * (self.dtype.itemsize + 4) + self.indptr.nbytes
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def read(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows ``start:stop`` as stored: a CSR matrix or a dense array (dtype as stored)."""
        if not self.sparse:
            return self._dense(start, stop)
        first = int(self.indptr[start])
        data, indices = self._nonzeros(first, int(self.indptr[stop]))
        indptr = self.indptr[start : stop + 1] - first
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.shape[1]))

    def rows(self, ordered: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """The stored rows ``ordered`` (ascending, repeats allowed), in that order: one read per run of
        nearby rows (runs closer than a few rows are read together and the rows between dropped)."""
        runs = np.split(ordered, np.flatnonzero(np.diff(ordered) > _GAP) + 1)
        if not self.sparse:
            return np.concatenate([self._dense(int(run[0]), int(run[-1]) + 1)[run - run[0]] for run in runs])
        data, indices = [], []
        for run in runs:
            first = int(self.indptr[run[0]])
            values, columns = self._nonzeros(first, int(self.indptr[run[-1] + 1]))
            starts, lengths = self.indptr[run] - first, self.indptr[run + 1] - self.indptr[run]
            offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)  # each kept row's nonzeros
            take = offsets + np.arange(offsets.size)
            data.append(values[take])
            indices.append(columns[take])
        lengths = self.indptr[ordered + 1] - self.indptr[ordered]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        return sp.csr_matrix(
            (np.concatenate(data), np.concatenate(indices), indptr), shape=(ordered.size, self.shape[1])
        )

    def _dense(self, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self._node()[start:stop])
        except (OSError, ValueError) as exc:
            raise self._unreadable(f"rows {start}-{stop}", exc) from None

    def _nonzeros(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._node("data")[first:last], self._node("indices")[first:last]
        except (OSError, ValueError) as exc:
            raise self._unreadable(f"nonzeros {first}-{last}", exc) from None

    def _unreadable(self, what: str, exc: Exception) -> DataFileError:
        return DataFileError(f"{self.path}: cannot read {what} of '{self.group}' ({exc}); the file may be truncated")

    @property
    def block_rows(self) -> int:
        """Rows a pass reads at a time: about :data:`VALUES_PER_READ` stored values."""
        per_row = int(self.indptr[-1]) / max(1, self.shape[0]) if self.sparse else self.shape[1]
        return max(1, int(VALUES_PER_READ // max(1.0, per_row)))

    def stored_blocks(self) -> Iterator[np.ndarray]:
        """The stored values, flat, a block of rows at a time (a CSR matrix's nonzeros)."""
        rows = self.block_rows
        for start in range(0, self.shape[0], rows):
            block = self.read(start, min(start + rows, self.shape[0]))
            yield block.data if sp.issparse(block) else block.ravel()

    def first_stored(self, count: int) -> np.ndarray:
        """The first ``count`` stored values (what ``omics.values.stored_values`` looks at in memory)."""
        if self.sparse:
            return np.asarray(self._file()[self.group]["data"][:count])
        rows = -(-count // max(1, self.shape[1]))
        return self.read(0, min(rows, self.shape[0])).ravel()[:count]


class ChunkedRows:
    """A member's log values in panel order, read from its file by rows (CSR blocks, float32).

    Parameters
    ----------
    source
        The matrix in the file.
    columns
        For each output column, the file column it reads, or -1 for a panel feature the file lacks (0).
    values
        ``"counts"``: library size to ``target_sum`` (over all the file's columns) and ``log1p`` at read;
        ``"normalized"``: the stored values as float32.
    extra
        ``(n_file_rows, c)`` values appended after the panel's columns as they are (clinical inputs).
    rows
        The file rows this view reads (default: all); :meth:`take` makes views.
    """

    ndim = 2
    dtype = np.dtype(np.float32)
    reads_rows = True  # models.data.ScaledRows reads it as it reads a CSR matrix, by rows

    def __init__(
        self,
        source: H5Matrix,
        *,
        columns: np.ndarray,
        values: str = "counts",
        target_sum: float = 1e4,
        extra: np.ndarray | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        self.source, self.values, self.target_sum = source, values, float(target_sum)
        self.columns = np.asarray(columns, dtype=np.int64)
        self.lookup = np.full(source.shape[1], -1, dtype=np.int64)  # file column -> output column
        present = np.flatnonzero(self.columns >= 0)
        self.lookup[self.columns[present]] = present
        self.extra = None if extra is None else np.asarray(extra, dtype=np.float32)
        self.rows = np.arange(source.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        width = self.columns.size + (0 if self.extra is None else self.extra.shape[1])
        return (int(self.rows.size), int(width))

    def __len__(self) -> int:
        return int(self.rows.size)

    def take(self, key) -> ChunkedRows:
        """A view of some of these rows (an index array, a boolean mask or a slice); nothing is read."""
        return self._view(self.rows[key], extra=self.extra)

    def panel(self) -> ChunkedRows:
        """These rows without the appended columns (the log values the statistics read)."""
        return self._view(self.rows, extra=None)

    def _view(self, rows: np.ndarray, *, extra) -> ChunkedRows:
        out = ChunkedRows.__new__(ChunkedRows)
        out.__dict__.update(self.__dict__, rows=np.asarray(rows, dtype=np.int64), extra=extra)
        return out

    def __getitem__(self, key) -> sp.csr_matrix:
        """The log values of rows ``key`` of this view (an index array in any order, a mask or a slice)."""
        if isinstance(key, tuple):
            raise TypeError("a chunked member's rows are read whole: index rows only (columns come with them)")
        return self._read(self.rows[key])

    def csr(self) -> sp.csr_matrix:
        """All rows of this view in one CSR matrix (small views only: it is held in memory)."""
        return self._read(self.rows)

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(first position, CSR block)`` over this view's rows, ``size`` rows (default: the source's
        :attr:`H5Matrix.block_rows`) at a time."""
        size = self.source.block_rows if size is None else int(size)
        for start in range(0, len(self), size):
            yield start, self._read(self.rows[start : start + size])

    def _read(self, wanted: np.ndarray) -> sp.csr_matrix:
        wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        order = np.argsort(wanted, kind="stable")
        # sorted, the rows are read in runs of contiguous rows; then put back in the order asked for
        out = self._log_values(self.source.rows(wanted[order]))[np.argsort(order, kind="stable")]
        if self.extra is not None:
            out = sp.hstack([out, sp.csr_matrix(self.extra[wanted])], format="csr", dtype=np.float32)
        return out

    def _log_values(self, block) -> sp.csr_matrix:
        """A block of stored rows -> float32 log values (omics.normalize's arithmetic), in panel columns."""
        if not sp.issparse(block):
            block = np.asarray(block, dtype=np.float32)
            if self.values == "counts":  # omics.normalize.library_size_normalized, then log1p
                totals = block.sum(axis=1, dtype=np.float64, keepdims=True)
                totals[totals == 0] = 1.0
                block = (block / totals * self.target_sum).astype(np.float32)
                np.log1p(block, out=block)
            picked = np.zeros((block.shape[0], self.columns.size), dtype=np.float32)
            present = self.columns >= 0
            picked[:, present] = block[:, self.columns[present]]
            return sp.csr_matrix(picked)
        data = block.data.astype(np.float32, copy=False)
        if self.values == "counts":  # omics.normalize._sparse_log_values
            values = data.astype(np.float64)
            lengths = np.diff(block.indptr)
            owner = np.repeat(np.arange(block.shape[0]), lengths)
            totals = np.bincount(owner, weights=values, minlength=block.shape[0])
            totals = np.where(totals > 0, totals, 1.0)
            data = np.log1p((values / totals[owner] * self.target_sum).astype(np.float32))
        targets = self.lookup[block.indices]
        keep = targets >= 0
        kept = np.concatenate([[0], np.cumsum(keep)])
        out = sp.csr_matrix(
            (data[keep], targets[keep], kept[block.indptr]), shape=(block.shape[0], self.columns.size), dtype=np.float32
        )
        out.sort_indices()
        return out


def csr_rows_per_block(X: sp.csr_matrix, *, nonzeros: int = VALUES_PER_READ) -> int:
    """How many rows of the CSR matrix ``X`` hold about ``nonzeros`` stored values (at least one): the
    block of rows a pass over its nonzeros takes at a time."""
    return max(1, int(nonzeros * X.shape[0] // max(1, X.nnz)))


def is_chunked(matrix) -> bool:
    """Whether ``matrix`` is a :class:`ChunkedRows` (read by row blocks, never whole)."""
    return isinstance(matrix, ChunkedRows)


def available_memory() -> int | None:
    """MemAvailable of ``/proc/meminfo`` in bytes (``None`` where the system has none)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def chunked_read(path: str | Path, *, group: str = "X", read: str = "auto", member: str = "") -> bool:
    """Whether a member's matrix is read in chunks: ``read`` is ``"chunks"``, or ``"auto"`` and the matrix
    held in memory while it is normalized (about :data:`_COPIES` times its stored size) would need more
    than :data:`MEMORY_SHARE` of the memory available. Logs which way and why."""
    who = f"member '{member}' ({path})" if member else str(path)
    if read not in ("auto", "memory", "chunks"):
        raise ValueError(f"{who}: read must be 'auto', 'memory' or 'chunks', got {read!r}")
    if read != "auto":
        log.info("%s: read %s (members[].read: %s)", who, "in chunks" if read == "chunks" else "into memory", read)
        return read == "chunks"
    try:
        needed, available = _COPIES * H5Matrix(path, group=group).nbytes, available_memory()
    except DataFileError as exc:  # read whole, the in-memory reading names the problem as it always has
        log.info("%s: read into memory: cannot size its matrix (%s)", who, exc)
        return False
    if available is None or needed <= MEMORY_SHARE * available:
        log.info("%s: read into memory (needs about %.0f MB; available %s)", who, needed / 2**20, _mb(available))
        return False
    log.info(
        "%s: read in chunks: in memory it would need about %.0f MB, more than %.0f%% of the %s available",
        who,
        needed / 2**20,
        100 * MEMORY_SHARE,
        _mb(available),
    )
    return True


def _mb(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**20:.0f} MB"
