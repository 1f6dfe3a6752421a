"""A serialized SEAL ciphertext opened as bytes: its ``c0`` polynomial as a NumPy array, and back.

TenSEAL's Python API does not expose a ciphertext's polynomials, and a member's seeded symmetric
ciphertext (:func:`jobs.he.packing.encrypt_flat`) stands for its random half ``c1`` by a 64-byte seed,
which SEAL expands on load and never writes back: loading it into a ``sealapi.Ciphertext`` to change
``c0`` would double the bytes on the wire. So ``c0`` is changed in the serialized bytes, in SEAL 4's
format (``native/src/seal/serialization.h``, ``ciphertext.cpp``, ``dynarray.h``, ``randomgen.cpp``):

- a 16-byte ``SEALHeader``: magic ``0xA15E`` (uint16), header size 16 (uint8), version major and minor
  (uint8 each), compression mode (uint8: 0 none, 1 zlib, 2 zstd), reserved (uint16), total size (uint64);
- the body, compressed as the header says: ``parms_id`` (4 x uint64), ``is_ntt_form`` (1 byte), ``size``,
  ``poly_modulus_degree``, ``coeff_modulus_size`` (uint64 each), ``scale`` (double), ``correction_factor``
  (uint64, SEAL 4 only); then the data as a nested, uncompressed ``DynArray`` (its own 16-byte header, a
  uint64 count, the uint64 values poly-major: polynomial, then RNS prime, then coefficient); then, for a
  seeded ciphertext (data count ``N * L`` instead of ``2 * N * L``), the seed (a 16-byte header, the PRNG
  type byte and 64 seed bytes).

The body is decompressed, ``c0``'s residues changed modulo each prime, and the whole written back in the
same compression mode: SEAL loads the result as it loads its own (tests/jobs/test_masks_ckks.py).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

SEAL_MAGIC = 0xA15E
HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression mode, reserved, total size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_METADATA = struct.Struct("<4QB3QdQ")  # parms_id, is_ntt_form, size, N, L, scale, correction factor (SEAL 4)
INCOMPRESSIBLE_BITS = 48
"""Residues of primes wider than this are written uncompressed after masking (see :func:`add_to_c0`)."""
_MAX_BODY = 1 << 28  # 256 MiB: far above any ciphertext at N <= 16384, below a decompression bomb


class SealFormatError(ValueError):
    """Bytes that are not a SEAL 4 ciphertext this module can open."""


def _header(data: bytes, *, where: str) -> tuple[int, int, int, int]:
    if len(data) < HEADER.size:
        raise SealFormatError(f"{where}: {len(data)} bytes, shorter than a SEAL header")
    magic, header_size, major, minor, mode, _, total = HEADER.unpack_from(data)
    if magic != SEAL_MAGIC or header_size != HEADER.size:
        raise SealFormatError(f"{where}: no SEAL header (magic {magic:#06x}); not a serialized SEAL object")
    if major != 4:
        raise SealFormatError(f"{where}: SEAL version {major}.{minor}; only SEAL 4's layout is read here")
    return major, minor, mode, total


def _decompress(data: bytes, mode: int) -> bytes:
    if mode == COMPR_NONE:
        return data
    if mode == COMPR_ZLIB:
        return zlib.decompress(data)
    if mode == COMPR_ZSTD:
        body = zstandard.ZstdDecompressor().stream_reader(data).read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise SealFormatError(f"body decompresses to more than {_MAX_BODY} bytes; not a ciphertext")
        return body
    raise SealFormatError(f"compression mode {mode} is none of SEAL's (0 none, 1 zlib, 2 zstd)")


def _compress(body: bytes, mode: int) -> bytes:
    if mode == COMPR_NONE:
        return body
    if mode == COMPR_ZLIB:
        return zlib.compress(body)
    return zstandard.ZstdCompressor().compress(body)


@dataclass
class CiphertextBytes:
    """An opened ciphertext: metadata, ``c0`` (``L x N`` residues, writable) and the bytes around it."""

    version: tuple[int, int]
    compression: int
    parms_id: tuple[int, int, int, int]
    is_ntt_form: bool
    size: int
    poly_modulus_degree: int
    scale: float
    c0: np.ndarray  # uint64, shape (coeff_modulus_size, poly_modulus_degree)
    seeded: bool
    _prefix: bytes  # metadata and the data array's header and count
    _rest: bytes  # c1 (when not seeded) and the seed (when seeded)

    @property
    def coeff_modulus_size(self) -> int:
        return int(self.c0.shape[0])

    @classmethod
    def parse(cls, data: bytes, *, where: str = "ciphertext") -> CiphertextBytes:
        """Open serialized ``sealapi.Ciphertext`` bytes; raises :class:`SealFormatError` on anything else."""
        major, minor, mode, total = _header(data, where=where)
        if total != len(data):
            raise SealFormatError(f"{where}: header says {total} bytes, got {len(data)}; truncated or padded")
        try:
            body = _decompress(bytes(data[HEADER.size :]), mode)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise SealFormatError(f"{where}: compressed body does not decompress ({exc})") from exc
        if len(body) < _METADATA.size + HEADER.size + 8:
            raise SealFormatError(f"{where}: body of {len(body)} bytes is too short for a ciphertext")
        *parms, ntt, size, degree, n_primes, scale, _ = _METADATA.unpack_from(body)
        _, _, array_mode, _ = _header(body[_METADATA.size :], where=f"{where} (data array)")
        if array_mode != COMPR_NONE:
            raise SealFormatError(f"{where}: the data array is compressed inside the body; SEAL never writes that")
        start = _METADATA.size + HEADER.size
        (count,) = struct.unpack_from("<Q", body, start)
        per_poly = degree * n_primes
        if size < 2 or per_poly == 0 or count not in (per_poly, size * per_poly):
            raise SealFormatError(
                f"{where}: {count} values for {size} polynomials of {n_primes} x {degree}; not a ciphertext's data"
            )
        start += 8
        end = start + 8 * per_poly
        if len(body) < 8 * count + start:
            raise SealFormatError(f"{where}: data array cut short ({len(body)} bytes)")
        c0 = np.frombuffer(body, dtype="<u8", count=per_poly, offset=start).astype(np.uint64).reshape(n_primes, degree)
        return cls(
            version=(major, minor),
            compression=mode,
            parms_id=tuple(parms),
            is_ntt_form=bool(ntt),
            size=size,
            poly_modulus_degree=degree,
            scale=scale,
            c0=c0,
            seeded=count == per_poly,
            _prefix=body[:start],
            _rest=body[end:],
        )

    def to_bytes(self, *, compression: int | None = None) -> bytes:
        """Serialize again (the same compression mode as read, unless ``compression`` is given)."""
        mode = self.compression if compression is None else compression
        if self.c0.shape != (self.coeff_modulus_size, self.poly_modulus_degree) or self.c0.dtype != np.uint64:
            raise ValueError(
                f"c0 must stay a uint64 array of shape {(self.coeff_modulus_size, self.poly_modulus_degree)}"
            )
        body = _compress(self._prefix + self.c0.astype("<u8").tobytes() + self._rest, mode)
        major, minor = self.version
        return HEADER.pack(SEAL_MAGIC, HEADER.size, major, minor, mode, 0, HEADER.size + len(body)) + body


def add_to_c0(
    data: bytes,
    masks: np.ndarray,
    moduli: np.ndarray,
    *,
    where: str = "ciphertext",
    parms_id: Sequence[int] | None = None,
) -> bytes:
    """``data`` with ``masks`` (shape ``L x N``, each row below its prime) added to ``c0`` modulo each prime.

    The ciphertext must be in NTT form (every CKKS ciphertext is): the masks are then NTT-domain residues,
    which is as uniform as coefficient-domain ones (the NTT is a bijection modulo each prime).
    """
    opened = CiphertextBytes.parse(data, where=where)
    if parms_id is not None and tuple(int(p) for p in parms_id) != opened.parms_id:
        raise SealFormatError(f"{where}: not at the expected modulus level (parms_id); expected a fresh ciphertext")
    if not opened.is_ntt_form:
        raise SealFormatError(f"{where}: not in NTT form; only CKKS ciphertexts are masked here")
    moduli = np.asarray(moduli, dtype=np.uint64).reshape(-1, 1)
    if masks.shape != opened.c0.shape or moduli.shape[0] != opened.coeff_modulus_size:
        raise ValueError(
            f"{where}: masks of shape {masks.shape} for {moduli.shape[0]} primes; the ciphertext's c0 is "
            f"{opened.c0.shape}"
        )
    if np.any(opened.c0 >= moduli) or np.any(masks >= moduli):
        raise ValueError(f"{where}: residues at or above their prime; the ciphertext or the masks are not reduced")
    c0 = opened.c0  # a fresh array (parse copies): summed in place, primes below 2^61 cannot overflow 64 bits
    c0 += masks
    reduced = c0 - moduli  # wraps above c0 where c0 < q
    np.minimum(c0, reduced, out=c0)
    # residues of primes above 2^48 are random in at least 6 of each word's 8 bytes: zstd gains nothing on
    # them (+10 bytes on a 65,714-byte body) and costs a pass, so such chunks are written uncompressed
    wide = int(moduli.min()).bit_length() > INCOMPRESSIBLE_BITS
    return opened.to_bytes(compression=COMPR_NONE if wide else None)
