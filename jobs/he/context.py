"""CKKS contexts for encrypted aggregation: make them, serialize them, load them in a FLARE site.

One implementation of the CKKS parameters for the whole platform: the key ceremony
(``provisioning``) and the loopback environments call :func:`make_contexts`, so a kit's contexts and a test's
contexts cannot drift apart. The two files keep the names NVFlare's ``HEBuilder`` writes
(``client_context.tenseal`` with the secret key for members, ``server_context.tenseal`` without
it for the operator) and the serialization of ``provisioning.he_keys.create_keys`` (public-key CKKS,
so every site shares a public fingerprint; relinearization keys; no Galois keys: the server only adds).
Members encrypt their updates with the secret key they hold (symmetric CKKS, :mod:`jobs.he.packing`:
half the bytes on the wire); the public key serves the key ceremony's fingerprint and pair check.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

import tenseal as ts

from schema.config import HomomorphicEncryption
from schema.names import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE

logger = logging.getLogger(__name__)


def make_contexts(he_settings: HomomorphicEncryption | None = None) -> tuple[bytes, bytes]:
    """A fresh CKKS key pair, serialized as ``(client_context, server_context)``.

    Parameters
    ----------
    he_settings
        ``privacy.he`` of the consortium config (any object with ``poly_modulus_degree``,
        ``coeff_mod_bit_sizes`` and ``global_scale_bits``); ``None`` uses the consortium defaults.

    Returns
    -------
    tuple of bytes
        ``client_context`` holds the secret key (members only); ``server_context`` holds none (the
        operator). Only the member key custodian should ever call this for a real consortium.
    """
    params = HomomorphicEncryption() if he_settings is None else he_settings
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    context.global_scale = 2**params.global_scale_bits
    client = context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=True)
    server = context.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    return client, server


def public_fingerprint(context: ts.Context) -> str:
    """The sha256 (hex) of the public part of ``context``: parameters, scale and public key.

    A member's secret context and the operator's public one of the same key pair give the same fingerprint
    (the secret key is never serialized here), so it names the key pair: the key ceremony records it, the
    server writes it into every encrypted aggregate it stores, and a release compares the custodian's key
    with it before decrypting. A freshly generated key serializes in a compressed, seeded form, a loaded
    one does not: the public part is round-tripped once so that the bytes do not depend on where the
    context came from. The key ceremony (:mod:`provisioning.he_keys`) records the same function's value.
    """
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    canonical = ts.context_from(public).serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(canonical).hexdigest()


def slot_count(context: ts.Context) -> int:
    """Values one CKKS vector holds: half the polynomial modulus degree."""
    return context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def headroom(context: ts.Context) -> float:
    """Largest absolute value a sum of ciphertexts may reach before it wraps around the modulus."""
    data_bits = context.seal_context().data.first_context_data().total_coeff_modulus_bit_count()
    scale_bits = int(round(context.global_scale).bit_length() - 1)
    return float(2 ** (data_bits - scale_bits - 1))


def context_from_bytes(data: bytes, *, source: str, private: bool) -> ts.Context:
    """Deserialize a context and check it holds a secret key exactly when ``private`` is True."""
    try:
        context = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError on garbage
        raise ValueError(f"{source}: not a TenSEAL context ({exc}); re-install it from the key ceremony") from exc
    if private and not context.is_private():
        raise ValueError(
            f"{source}: holds no secret key, so this member could not decrypt the aggregate; install the "
            f"member custodian's {CLIENT_CONTEXT_FILE} (the one with the secret key) into the kit's startup/"
        )
    if not private and context.is_private():
        raise ValueError(
            f"{source}: holds a SECRET key, but the operator's server must only hold the public context; "
            f"replace it with the custodian's {SERVER_CONTEXT_FILE} and treat this key pair as compromised"
        )
    return context


def load_context_from_workspace(fl_ctx: Any, file_name: str, *, private: bool) -> ts.Context:
    """Load a context from the site's ``startup/`` folder, found through the FLARE workspace.

    A context installed by the member custodian after provisioning is not in the kit's
    ``signature.json`` (the operator's root CA must never see a secret context to sign it), so an
    unsigned file is accepted; a file that *is* listed there but fails its signature is refused.
    """
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if workspace is None:
        workspace = fl_ctx.get_engine().get_workspace()
    path = os.path.join(workspace.get_startup_kit_dir(), file_name)
    if not os.path.isfile(path):
        raise ValueError(
            f"{path}: no HE context here; run the key ceremony ('consortium keys') and install "
            f"{file_name} into this site's startup/ folder"
        )
    _, result = SecurityContentService.load_content(file_name)
    if result == LoadResult.INVALID_SIGNATURE:
        raise ValueError(f"{path}: its signature in signature.json does not match; the file was altered")
    with open(path, "rb") as handle:
        data = handle.read()
    logger.info("loaded HE context %s (signature check: %s)", path, getattr(result, "value", result))
    return context_from_bytes(data, source=path, private=private)


def _has_public_key(context: ts.Context) -> bool:
    try:
        return bool(context.has_public_key())
    except ValueError:  # symmetric contexts (NVFlare's HEBuilder) raise instead of answering
        return False


def check_key_pair(client: ts.Context, server: ts.Context) -> None:
    """Raise unless ``server`` is the public half of ``client`` (same parameters, same key).

    With a public key on the server side the probe is encrypted there and decrypted by the member,
    which proves one key pair; without one, the member's ciphertext must at least add up on the server.
    """
    probe = [0.5, -1.25, 3.0]
    try:
        if _has_public_key(server):
            vector = ts.ckks_vector(server, probe)
            expected = probe
        else:
            vector = ts.ckks_vector_from(server, ts.ckks_vector(client, probe).serialize())
            vector.add_(vector.copy())
            expected = [2 * v for v in probe]
        decrypted = ts.ckks_vector_from(client, vector.serialize()).decrypt()
    except Exception as exc:  # TenSEAL raises bare errors on mismatched parameters
        raise ValueError(f"the client and server contexts do not fit together ({exc}); use one key ceremony") from exc
    # fresh CKKS noise is a few thousand units of 2^-scale (~2e-3 at a 2^20 scale); a wrong key gives values
    # of the order of the modulus over the scale, so this bound tells the two apart at every allowed scale
    tolerance = max(1e-3, 2.0 ** (15 - math.log2(client.global_scale)))
    if max(abs(a - b) for a, b in zip(decrypted, expected, strict=True)) > tolerance:
        raise ValueError("the client and server contexts are not one key pair; install both from one key ceremony")


class WorkspaceContext:
    """A site's TenSEAL context, loaded from its startup kit on first use (or at START_RUN), dropped at END_RUN.

    Shared by the member filters (secret context) and the server's aggregator (public context).
    """

    def __init__(self, file_name: str, *, private: bool) -> None:
        self.file_name = file_name
        self.private = private
        self._context: ts.Context | None = None

    def on_event(self, event_type: str, fl_ctx: Any) -> None:
        from nvflare.apis.event_type import EventType

        if event_type == EventType.START_RUN:
            self.get(fl_ctx)
        elif event_type == EventType.END_RUN:
            self._context = None

    def get(self, fl_ctx: Any) -> ts.Context:
        if self._context is None:
            self._context = load_context_from_workspace(fl_ctx, self.file_name, private=self.private)
        return self._context
