"""Packed CKKS payloads: the whole trunk as one flat vector, two values per slot, half a ciphertext on the wire.

NVFlare's stock ``HEModelEncryptor`` makes one ciphertext per layer (so a 64-value bias costs a
whole 4096-slot ciphertext) and FOBS attaches a copy of the context to every one of them. Here:

- all layers are flattened into one vector in a recorded :class:`Layout` and cut into chunks;
- a chunk fills the CKKS slots' real *and* imaginary parts (TenSEAL's vectors leave the imaginary
  half empty): ``N`` values per ciphertext instead of ``N / 2``;
- a member encrypts with the secret key it holds anyway (symmetric CKKS), so SEAL serializes the
  ciphertext's uniformly random half as a 64-byte seed: half the bytes of a public-key ciphertext;
- each chunk is serialized without its context: the receiver deserializes against its own.

Together: 8 bytes per value at N=8192, [60, 40], scale 2^40 (TenSEAL's public-key vectors: 32), with
the same CKKS noise (~1e-9). The server's sum is a full ciphertext again (16 bytes per value).
Plain ``tenseal.sealapi`` (TenSEAL's public SEAL bindings) + NumPy, testable without a FLARE process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from tenseal import sealapi

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


def chunk_capacity(context: ts.Context) -> int:
    """Values one ciphertext carries: two per slot (real and imaginary part), i.e. the ring degree N."""
    return 2 * slot_count(context)


def pack_slots(values: np.ndarray) -> np.ndarray:
    """A chunk's values as complex slots: the first half in the real parts, the second in the imaginary."""
    half = -(-values.size // 2)
    slots = np.zeros(half, dtype=np.complex128)
    slots.real = values[:half]
    slots.imag[: values.size - half] = values[half:]
    return slots


def unpack_slots(slots: np.ndarray, *, n_values: int) -> np.ndarray:
    """Inverse of :func:`pack_slots` for a chunk of ``n_values`` values."""
    half = -(-n_values // 2)
    return np.concatenate([slots.real[:half], slots.imag[: n_values - half]])


def slot_peak(values: np.ndarray, *, capacity: int) -> float:
    """Largest slot magnitude ``|re + i im|`` of ``values`` packed in chunks of ``capacity``.

    It bounds every coefficient of the encoded plaintext (divided by the scale), so it is what the
    headroom guard must compare against the modulus.
    """
    peak = 0.0
    for start in range(0, values.size, capacity):
        chunk = pack_slots(values[start : start + capacity])
        peak = max(peak, float(np.max(np.abs(chunk))))
    return peak


class ScratchFile:
    """A scratch file for SEAL's path-only ``save``/``load`` bindings: in memory (memfd) where Linux allows."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


@contextlib.contextmanager
def scratch_file() -> Iterator[ScratchFile]:
    """A scratch file for one batch of SEAL saves/loads, removed afterwards."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("consortium-ckks")
        try:
            yield ScratchFile(fd, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="consortium-ckks-") as folder:
        path = os.path.join(folder, "chunk")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            yield ScratchFile(fd, path)
        finally:
            os.close(fd)


def encrypt_flat(context: ts.Context, flat: np.ndarray) -> list[bytes]:
    """Encrypt ``flat`` with the member's secret key, :func:`chunk_capacity` values a ciphertext.

    Each chunk is a seeded symmetric ciphertext, serialized without context.
    """
    if not context.is_private():
        raise ValueError("this context holds no secret key; only a member encrypts its update (symmetric CKKS)")
    seal_context = context.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_context)
    encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
    capacity, scale = chunk_capacity(context), context.global_scale
    chunks = []
    with scratch_file() as scratch:
        for start in range(0, flat.size, capacity):
            plain = sealapi.Plaintext()
            encoder.encode(pack_slots(flat[start : start + capacity]).tolist(), scale, plain)
            encryptor.encrypt_symmetric(plain).save(scratch.path)
            chunks.append(scratch.read())
    return chunks


def load_chunks(context: ts.Context, chunks: Iterable[bytes]) -> list[sealapi.Ciphertext]:
    """Deserialize ciphertext chunks against ``context`` (public or secret, both work).

    A chunk must be a fresh two-part ciphertext at the context's first level and scale: anything else
    cannot be added to the others (or was not made by :func:`encrypt_flat` under this key ceremony).
    """
    seal_context = context.seal_context().data
    first = seal_context.first_parms_id()
    vectors = []
    with scratch_file() as scratch:
        for index, chunk in enumerate(chunks):
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError(f"ciphertext chunk {index} is {type(chunk).__name__}, not bytes")
            scratch.write(bytes(chunk))
            vector = sealapi.Ciphertext()
            try:
                vector.load(seal_context, scratch.path)
            except (RuntimeError, ValueError) as exc:  # SEAL's own checks: version, parameters, sizes
                raise ValueError(
                    f"ciphertext chunk {index} is not a CKKS ciphertext of this key ceremony's parameters ({exc})"
                ) from exc
            if vector.size() != 2 or vector.parms_id() != first or vector.scale != context.global_scale:
                raise ValueError(
                    f"ciphertext chunk {index}: size {vector.size()}, scale 2^{np.log2(vector.scale):.0f}; expected a "
                    f"fresh ciphertext at scale 2^{np.log2(context.global_scale):.0f} (jobs.he.packing.encrypt_flat)"
                )
            vectors.append(vector)
    return vectors


def add_into(
    context: ts.Context, total: list[sealapi.Ciphertext] | None, addend: list[sealapi.Ciphertext]
) -> list[sealapi.Ciphertext]:
    """Element-wise ciphertext addition, in place on ``total``: no multiplication, no modulus level used."""
    if total is None:
        return list(addend)
    if len(total) != len(addend):
        raise ValueError(f"cannot add {len(addend)} ciphertext chunks to {len(total)}; the layouts differ")
    evaluator = sealapi.Evaluator(context.seal_context().data)
    for chunk, other in zip(total, addend, strict=True):
        evaluator.add_inplace(chunk, other)
    return total


def serialize_chunks(vectors: Iterable[sealapi.Ciphertext]) -> list[bytes]:
    """Serialize ciphertexts (a sum is a full ciphertext: no seed to stand for its random half)."""
    out = []
    with scratch_file() as scratch:
        for vector in vectors:
            vector.save(scratch.path)
            out.append(scratch.read())
    return out


def decrypt_flat(context: ts.Context, chunks: Sequence[bytes], *, n_values: int) -> np.ndarray:
    """Decrypt serialized chunks with a secret context into one float64 vector of ``n_values``."""
    if not context.is_private():
        raise ValueError("this context holds no secret key; only a member can decrypt the aggregate")
    capacity = chunk_capacity(context)
    if len(chunks) != -(-n_values // capacity):
        raise ValueError(f"{len(chunks)} ciphertext chunks cannot hold the layout's {n_values} values")
    seal_context = context.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_context)
    decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)
    values = []
    for index, vector in enumerate(load_chunks(context, chunks)):
        plain = sealapi.Plaintext()
        decryptor.decrypt(vector, plain)
        slots = np.asarray(encoder.decode_complex(plain), dtype=np.complex128)
        values.append(unpack_slots(slots, n_values=min(capacity, n_values - index * capacity)))
    return np.concatenate(values) if values else np.zeros(0)
