"""A member's mask keys on disk: its private X25519 key and every member's public key.

- ``startup/mask_key.x25519``: the member's private key, 32 raw bytes, mode 0600, made in its own kit
  (:func:`create_member_key`) and never copied anywhere else;
- ``startup/mask_public_keys.json``: ``{"version": ..., "members": {site: public key hex}}``, the same
  file in every member kit (:func:`write_public_keys`), so each pair of members derives its shared key.

:func:`load_masker` reads both for a site and checks that the private key is the one the list names.
The files are parsed, never evaluated: a damaged file is an error naming it and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from jobs.he.masks import (
    MASK_VERSION,
    PairwiseMasker,
    key_fingerprint,
    load_private_key,
    new_private_key,
    private_bytes,
    public_bytes,
)
from schema.names import MASK_KEY_FILE, MASK_PUBLIC_KEYS_FILE

FIX = "run the mask-key ceremony again ('consortium keys masks')"


def create_member_key(folder: Path, *, replace: bool = False) -> bytes:
    """Make a member's key pair in ``folder`` (its kit's ``startup/``); returns the raw public key.

    An existing key is kept (its public key returned) unless ``replace``.
    """
    folder = Path(folder)
    path = folder / MASK_KEY_FILE
    if path.exists() and not replace:
        return public_bytes(load_private_key(path.read_bytes(), source=str(path)))
    folder.mkdir(parents=True, exist_ok=True)
    key = new_private_key()
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_bytes(key))
    os.replace(temporary, path)
    return public_bytes(key)


def write_public_keys(folder: Path, public_keys: Mapping[str, bytes]) -> Path:
    """Write every member's public key into ``folder``/mask_public_keys.json (atomically)."""
    path = Path(folder) / MASK_PUBLIC_KEYS_FILE
    document = {"version": MASK_VERSION, "members": {str(n): bytes(k).hex() for n, k in sorted(public_keys.items())}}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_public_keys(path: Path) -> dict[str, bytes]:
    """The members' raw public keys from a ``mask_public_keys.json``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no public mask keys here; {FIX}")
    try:
        document = json.loads(path.read_text())
        members = document["members"]
        if document.get("version") != MASK_VERSION or not isinstance(members, dict):
            raise ValueError(f"version {document.get('version')!r}, expected {MASK_VERSION!r}")
        keys = {str(name): bytes.fromhex(str(value)) for name, value in members.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a public mask key list ({exc}); {FIX}") from exc
    short = sorted(name for name, key in keys.items() if len(key) != 32)
    if short:
        raise ValueError(f"{path}: the keys of {short} are not 32 bytes; {FIX}")
    return keys


def fingerprints(public_keys: Mapping[str, bytes]) -> dict[str, str]:
    """sha256 of each member's public mask key: what the audit log records."""
    return {name: key_fingerprint(key) for name, key in sorted(public_keys.items())}


def load_masker(folder: Path, name: str, *, min_members: int | None) -> PairwiseMasker:
    """Site ``name``'s masker from its ``folder`` (kit ``startup/``, or a simulated member's key folder)."""
    folder = Path(folder)
    key_path = folder / MASK_KEY_FILE
    if not key_path.is_file():
        raise ValueError(
            f"{key_path}: no mask key for '{name}'; secure aggregation needs one in each member kit; {FIX}"
        )
    private = load_private_key(key_path.read_bytes(), source=str(key_path))
    public_keys = read_public_keys(folder / MASK_PUBLIC_KEYS_FILE)
    if name not in public_keys:
        raise ValueError(f"{folder / MASK_PUBLIC_KEYS_FILE}: no public mask key for '{name}' itself; {FIX}")
    if public_keys[name] != public_bytes(private):
        raise ValueError(
            f"{key_path}: this private key is not the one {MASK_PUBLIC_KEYS_FILE} names for '{name}'; {FIX}"
        )
    return PairwiseMasker(name, private, public_keys, min_members=min_members)


def make_member_keys(root: Path, members: list[str]) -> dict[str, Path]:
    """Simulated and POC members on one machine: a key pair in ``root/<member>`` each, the list in every folder.

    Returns each member's folder. On provisioned kits each member runs :func:`create_member_key` in its own kit.
    """
    folders = {name: Path(root) / name for name in members}
    publics = {name: create_member_key(folder) for name, folder in folders.items()}
    for folder in folders.values():
        write_public_keys(folder, publics)
    return folders
