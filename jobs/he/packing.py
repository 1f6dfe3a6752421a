"""Packed CKKS payloads: the whole trunk as one flat vector, chunked by slot count.

NVFlare's stock ``HEModelEncryptor`` makes one ciphertext per layer (so a 64-value bias costs a
whole 4096-slot ciphertext) and FOBS attaches a copy of the context to every one of them. Here all
layers are flattened into one vector in a recorded :class:`Layout`, cut into ``slots``-sized
chunks, and each chunk is serialized without its context: the receiver deserializes against its own.

Everything here is plain TenSEAL + NumPy, testable without a FLARE process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from jobs.he.context import slot_count


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the packed arrays, in packing order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def to_meta(self) -> list[list]:
        """A JSON/FOBS-friendly form: ``[[name, [dims...]], ...]``."""
        return [[name, list(shape)] for name, shape in zip(self.names, self.shapes, strict=True)]

    @classmethod
    def from_meta(cls, meta: Sequence[Sequence]) -> Layout:
        names = tuple(str(entry[0]) for entry in meta)
        shapes = tuple(tuple(int(d) for d in entry[1]) for entry in meta)
        if len(set(names)) != len(names):
            raise ValueError(f"layout repeats names: {sorted(n for n in names if names.count(n) > 1)}")
        return cls(names=names, shapes=shapes)


def flatten(params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Concatenate arrays (in mapping order) into one float64 vector; returns it with its layout."""
    if not params:
        raise ValueError("no parameters to pack; the client script must send the trunk in FLModel.params")
    arrays = []
    for name, value in params.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"parameter '{name}' has dtype {array.dtype}; only numeric arrays can be encrypted")
        arrays.append(array)
    layout = Layout(names=tuple(params), shapes=tuple(tuple(a.shape) for a in arrays))
    flat = np.concatenate([a.astype(np.float64, copy=False).ravel() for a in arrays])
    if not np.all(np.isfinite(flat)):
        bad = [n for n, a in zip(layout.names, arrays, strict=True) if not np.all(np.isfinite(a))]
        raise ValueError(f"parameters {bad} hold NaN or inf; training diverged, lower the learning rate")
    return flat, layout


def unflatten(flat: np.ndarray, layout: Layout, *, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays of ``layout``."""
    if flat.size < layout.total:
        raise ValueError(f"flat vector has {flat.size} values, layout needs {layout.total}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes, strict=True):
        out[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
        offset += size
    return out


def encrypt_flat(context: ts.Context, flat: np.ndarray) -> list[bytes]:
    """Encrypt ``flat`` in chunks of the context's slot count; each chunk serialized without context."""
    slots = slot_count(context)
    return [ts.ckks_vector(context, flat[start : start + slots]).serialize() for start in range(0, flat.size, slots)]


def load_chunks(context: ts.Context, chunks: Iterable[bytes]) -> list[ts.CKKSVector]:
    """Deserialize ciphertext chunks against ``context`` (public or secret, both work)."""
    vectors = []
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError(f"ciphertext chunk {index} is {type(chunk).__name__}, not bytes")
        vectors.append(ts.ckks_vector_from(context, bytes(chunk)))
    return vectors


def add_into(total: list[ts.CKKSVector] | None, addend: list[ts.CKKSVector]) -> list[ts.CKKSVector]:
    """Element-wise ciphertext addition, in place on ``total``: no multiplication, no modulus level used."""
    if total is None:
        return list(addend)
    if len(total) != len(addend):
        raise ValueError(f"cannot add {len(addend)} ciphertext chunks to {len(total)}; the layouts differ")
    for chunk, other in zip(total, addend, strict=True):
        if chunk.size() != other.size():
            raise ValueError(f"cannot add a {other.size()}-value chunk to a {chunk.size()}-value chunk")
        chunk.add_(other)
    return total


def decrypt_flat(context: ts.Context, chunks: Iterable[bytes], *, n_values: int) -> np.ndarray:
    """Decrypt serialized chunks with a secret context into one float64 vector of ``n_values``."""
    if not context.is_private():
        raise ValueError("this context holds no secret key; only a member can decrypt the aggregate")
    values = [np.asarray(vector.decrypt(), dtype=np.float64) for vector in load_chunks(context, chunks)]
    flat = np.concatenate(values) if values else np.zeros(0)
    if flat.size != n_values:
        raise ValueError(f"decrypted {flat.size} values, the layout has {n_values}")
    return flat
