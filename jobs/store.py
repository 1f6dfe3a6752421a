"""The global aggregate on disk: what the server stores each round and a member reads after the run.

No pickle, so a member can read an operator's file safely. Format: the magic line
``consortium-aggregate/1\\n``, a 4-byte big-endian header length, a JSON header, then the payload
bytes back to back. The header says whether the payload is plaintext (float64 arrays, sum-ready
values) or ciphertext (CKKS chunks per section, :mod:`jobs.he.payload`), and carries the sections
meta (:mod:`jobs.sections`), which is plaintext in both cases, the round it closes and, for ciphertext,
the fingerprint of the public context it was added under (:func:`jobs.he.context.public_fingerprint`),
which a release compares with the custodian's key before it decrypts.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.he.packing import Layout
from jobs.he.payload import EncryptedSection, EncryptedUpdate
from jobs.sections import SECTIONS_META

_MAGIC = b"consortium-aggregate/1\n"


@dataclass
class StoredAggregate:
    """A stored aggregate: plaintext ``params`` or an ``encrypted`` update, with its ``meta``."""

    meta: dict
    params: dict[str, np.ndarray] | None = None
    encrypted: EncryptedUpdate | None = None
    round: int | None = None  # the round it is the aggregate of (None in files written before it was kept)
    he_fingerprint: str | None = None  # ciphertext: the public context's fingerprint (None if not recorded)


def write_aggregate(
    path: str | Path,
    *,
    meta: Mapping,
    params: Mapping[str, np.ndarray] | None = None,
    encrypted: EncryptedUpdate | None = None,
    round_: int | None = None,
    he_fingerprint: str | None = None,
) -> int:
    """Write one aggregate (of round ``round_``) atomically (temporary file + rename); returns the payload
    bytes. ``he_fingerprint``: with ``encrypted``, the fingerprint of the public context it was added under."""
    if (params is None) == (encrypted is None):
        raise ValueError("give either plaintext params or an encrypted update")
    if he_fingerprint is not None and encrypted is None:
        raise ValueError("a key fingerprint belongs to an encrypted aggregate only")
    blobs: list[bytes] = []
    if encrypted is not None:
        entries = {
            name: {"layout": s.layout.to_meta(), "chunk_bytes": [len(c) for c in s.chunks]}
            for name, s in encrypted.sections.items()
        }
        blobs = [c for s in encrypted.sections.values() for c in s.chunks]
        header = {"encrypted": True, "meta": {SECTIONS_META: encrypted.meta.get(SECTIONS_META, {})}, "entries": entries}
    else:
        arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
        entries = {k: list(a.shape) for k, a in arrays.items()}
        blobs = [a.tobytes() for a in arrays.values()]
        header = {"encrypted": False, "meta": {SECTIONS_META: dict(meta).get(SECTIONS_META, {})}, "entries": entries}
    if round_ is not None:
        header["round"] = int(round_)
    if he_fingerprint is not None:
        header["he_fingerprint"] = str(he_fingerprint)
    encoded = json.dumps(header).encode()
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(_MAGIC)
        handle.write(struct.pack(">I", len(encoded)))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)
    os.replace(temp, path)
    return sum(len(b) for b in blobs)


def read_aggregate(path: str | Path) -> StoredAggregate:
    """Read a file written by :func:`write_aggregate`; a clear ValueError for anything else."""
    data = Path(path).read_bytes()
    header, offset = _header(data, path)
    damaged = f"{path}: the file is truncated or corrupt; copy {Path(path).name} from the server again"
    announced = _payload_size(header)
    if len(data) - offset != announced:
        raise ValueError(f"{damaged} (header announces {announced} payload bytes, the file holds {len(data) - offset})")
    meta = header["meta"]
    if header["encrypted"]:
        sections = {}
        for name, entry in header["entries"].items():
            chunks = []
            for length in entry["chunk_bytes"]:
                chunks.append(data[offset : offset + length])
                offset += length
            sections[name] = EncryptedSection(chunks, Layout.from_meta(entry["layout"]))
        stored = StoredAggregate(
            meta=meta,
            encrypted=EncryptedUpdate(sections=sections, meta=dict(meta)),
            round=header.get("round"),
            he_fingerprint=header.get("he_fingerprint"),
        )
    else:
        params = {}
        for key, shape in header["entries"].items():
            count = int(np.prod(shape, dtype=np.int64))
            params[key] = np.frombuffer(data, dtype=np.float64, count=count, offset=offset).reshape(shape).copy()
            offset += 8 * count
        stored = StoredAggregate(meta=meta, params=params, round=header.get("round"))
    return stored


def aggregate_round(path: str | Path) -> int | None:
    """The round a stored aggregate closes, from its header alone (the payload is not read)."""
    with open(path, "rb") as handle:
        start = handle.read(len(_MAGIC) + 4)
        size = struct.unpack(">I", start[-4:])[0] if len(start) == len(_MAGIC) + 4 else 0
        header, _ = _header(start + handle.read(size), path)
    return header.get("round")


def _header(data: bytes, path: str | Path) -> tuple[dict, int]:
    """The JSON header of a stored aggregate and where its payload starts."""
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a consortium aggregate; pick the job's {Path(path).name} from the server")
    offset = len(_MAGIC)
    damaged = f"{path}: the file is truncated or corrupt; copy {Path(path).name} from the server again"
    try:
        (size,) = struct.unpack(">I", data[offset : offset + 4])
        header = json.loads(data[offset + 4 : offset + 4 + size])
    except (struct.error, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{damaged} (header unreadable: {exc})") from None
    return header, offset + 4 + size


def _payload_size(header: Mapping) -> int:
    """Bytes of payload that a header announces: ciphertext chunks, or float64 arrays."""
    if header["encrypted"]:
        return sum(int(n) for entry in header["entries"].values() for n in entry["chunk_bytes"])
    return sum(8 * int(np.prod(shape, dtype=np.int64)) for shape in header["entries"].values())
