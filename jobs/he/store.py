"""The encrypted global trunk on disk: what the server stores and a member decrypts after a run.

Format (no pickle, so a member can read an operator's file safely): the magic line
``consortium-ckks-packed/1\\n``, a 4-byte big-endian header length, a JSON header (layout, weight,
contributors, chunk lengths), then the ciphertext chunks back to back.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import tenseal as ts

from jobs.he.context import CLIENT_CONTEXT_FILE, context_from_bytes
from jobs.he.packing import Layout
from jobs.he.payload import HE_FORMAT, EncryptedUpdate, decrypt_average

_MAGIC = (HE_FORMAT + "\n").encode()


def write_encrypted_aggregate(path: str | Path, update: EncryptedUpdate) -> None:
    """Write ``update`` to ``path`` atomically (temporary file + rename)."""
    header = json.dumps(
        {
            "layout": update.layout.to_meta(),
            "weight": update.weight,
            "contributors": update.contributors,
            "chunk_bytes": [len(c) for c in update.chunks],
        }
    ).encode()
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(_MAGIC)
        handle.write(struct.pack(">I", len(header)))
        handle.write(header)
        for chunk in update.chunks:
            handle.write(chunk)
    os.replace(temp, path)


def read_encrypted_aggregate(path: str | Path) -> EncryptedUpdate:
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not an encrypted aggregate ({HE_FORMAT}); pick the run's FL_global_model.ckks")
    offset = len(_MAGIC)
    (size,) = struct.unpack(">I", data[offset : offset + 4])
    header = json.loads(data[offset + 4 : offset + 4 + size])
    offset += 4 + size
    chunks = []
    for length in header["chunk_bytes"]:
        chunks.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} trailing bytes; the file is truncated or corrupt")
    return EncryptedUpdate(
        chunks=chunks,
        layout=Layout.from_meta(header["layout"]),
        weight=float(header["weight"]),
        contributors=int(header["contributors"]),
    )


def decrypt_aggregate_file(path: str | Path, *, client_context: bytes | ts.Context) -> dict[str, np.ndarray]:
    """The plain global trunk (``sum w_i x_i / sum w_i``) from a stored aggregate, for a member.

    ``client_context`` is the member's ``startup/client_context.tenseal`` (bytes or a loaded context).
    """
    if isinstance(client_context, (bytes, bytearray)):
        client_context = context_from_bytes(bytes(client_context), source=CLIENT_CONTEXT_FILE, private=True)
    return decrypt_average(client_context, read_encrypted_aggregate(path))
