"""The HE key ceremony: CKKS contexts made by a member's key custodian, never by the operator.

Stock NVFlare makes HE contexts inside provisioning (HEBuilder), so whoever provisions holds every
member's secret key. Here the operator provisions without HE, and a custodian (one member, on its own
machine) runs :func:`create_keys`, then :func:`install_keys` on the kits before they are shipped:

- ``client_context.tenseal``: the secret context (secret key, public key, relinearization keys), the
  same for every member, copied to ``<member>/startup/``;
- ``server_context.tenseal``: the public context (no secret key), copied to ``<server>/startup/``.

These are the file names NVFlare's HEBuilder writes. :func:`verify_keys` proves the server holds no
secret key (it parses every file of the server kit, and of its workspace when given, as a TenSEAL
context, whatever its name) and that every site shares the same public key and parameters. The public
fingerprint (the sha256 of the context's public part: parameters, scale and public key, re-serialized so
that it does not depend on how a file was written) names the key set in the audit log and in
``he_context.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import tenseal as ts

from jobs.he.context import check_key_pair, make_contexts, public_fingerprint
from provisioning.errors import KeyCeremonyError, KeyVerificationError
from schema.config import ConsortiumConfig, HomomorphicEncryption
from schema.names import CLIENT_CONTEXT_FILE as CLIENT_CONTEXT
from schema.names import HE_MANIFEST_FILE as MANIFEST
from schema.names import SERVER_CONTEXT_FILE as SERVER_CONTEXT
from schema.writes import WriteError, atomic_write

MAX_SCAN_BYTES = 50 * 1024 * 1024
"""Files larger than this are not parsed when searching for secret keys (a context is far smaller)."""
CUSTODIAN_SUFFIX = ".custodian"


@dataclass
class KeySet:
    """What :func:`create_keys` wrote."""

    secret_context: Path
    public_context: Path
    manifest: Path
    fingerprint: str


@dataclass
class Finding:
    """One problem :func:`verify_keys` found: the file and what is wrong with it."""

    path: Path
    problem: str


def raise_for_findings(findings: list[Finding], *, what: str) -> None:
    """A :class:`KeyVerificationError` listing each finding's file and problem, if there is any."""
    if findings:
        lines = "\n".join(f"  {f.path}: {f.problem}" for f in findings)
        raise KeyVerificationError(f"{what} failed:\n{lines}", findings=findings)


@dataclass
class KeyReport:
    """The outcome of :func:`verify_keys`."""

    fingerprint: str | None = None
    checked: dict[str, str] = field(default_factory=dict)  # site -> "secret" | "public"
    findings: list[Finding] = field(default_factory=list)
    scanned: int = 0
    """Files of the server kit (and workspace) parsed in the search for secret keys."""
    skipped: list[Path] = field(default_factory=list)
    """Files too large to parse (over :data:`MAX_SCAN_BYTES`)."""

    @property
    def ok(self) -> bool:
        return not self.findings

    def raise_for_failure(self) -> None:
        raise_for_findings(self.findings, what="HE key verification")


def load_context(path: Path) -> ts.Context:
    """Load a TenSEAL context file; :class:`KeyCeremonyError` names the file when it cannot."""
    try:
        return ts.context_from(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyCeremonyError(f"{path}: missing; run 'consortium keys create' first") from None
    except Exception as exc:  # tenseal raises bare exceptions on malformed bytes
        raise KeyCeremonyError(f"{path}: not a TenSEAL context ({exc})") from None


def custodian_folder(keys: Path) -> Path:
    """``<keys>.custodian/``: the key custodian's private folder beside its keys folder (its audit
    signing key), so that handing on a file or a copy of the keys folder never hands on its signature."""
    keys = Path(keys).resolve()
    return keys.with_name(keys.name + CUSTODIAN_SUFFIX)


def create_keys(he_settings: HomomorphicEncryption, *, out: Path) -> KeySet:
    """Create the consortium's CKKS key pair in ``out`` (run by a member's key custodian).

    No Galois keys: the server only adds ciphertexts. Refuses to overwrite existing keys, since a new
    key pair makes every model encrypted under the old one undecryptable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KeyCeremonyError(f"--out {out}: is a file; give a folder for the key pair (it is created if absent)")
    secret_path, public_path = out / CLIENT_CONTEXT, out / SERVER_CONTEXT
    existing = [p for p in (secret_path, public_path) if p.exists()]
    if existing:
        raise KeyCeremonyError(
            f"{existing[0]}: HE keys already exist; a new key pair would orphan everything encrypted under "
            "them. Move them away deliberately, or use another folder"
        )
    secret, public = make_contexts(he_settings)  # the settings were checked when consortium.yaml was read
    context = ts.context_from(public)
    fingerprint = public_fingerprint(context)

    manifest = out / MANIFEST
    try:
        out.mkdir(parents=True, exist_ok=True)
        # TenSEAL serialized in memory: SEAL writing a file itself reports a full disk as "basic_ios::clear"
        _write_private(secret_path, secret)
        atomic_write(public_path, public)
        atomic_write(manifest, json.dumps(_manifest(he_settings, fingerprint), indent=2) + "\n")
    except (OSError, WriteError) as exc:
        for written in (secret_path, public_path, manifest):  # none existed before: leave no half key pair
            with contextlib.suppress(OSError):
                written.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        raise KeyCeremonyError(
            f"--out {out}: cannot write the key pair ({exc.strerror}: {exc.filename}); choose a folder you can write"
        ) from None
    return KeySet(secret_path, public_path, manifest, fingerprint)


def install_keys(kits: Path, keys: Path, *, config: ConsortiumConfig, members: list[str] | None = None) -> list[Path]:
    """Copy the secret context into member kits and the public context into the server kit.

    ``members`` limits the install to those members (a member added later) and leaves the server kit
    alone; by default every member and the server get theirs. The same key pair is installed each time:
    nothing is ever re-keyed here.
    """
    kits, keys = Path(kits), Path(keys)
    secret_path, public_path = keys / CLIENT_CONTEXT, keys / SERVER_CONTEXT
    for path in (secret_path, public_path):
        if not path.is_file():
            raise KeyCeremonyError(f"{path}: missing; run 'consortium keys create --out {keys}' first")
    _check_key_files(secret_path, public_path)
    names = members if members is not None else [m.name for m in config.members]
    targets = [(kits / config.member(name).name / "startup", secret_path) for name in names]
    if members is None:
        targets.append((kits / config.operator.host / "startup", public_path))
    missing = [folder for folder, _ in targets if not folder.is_dir()]
    if missing:
        raise KeyCeremonyError(f"{missing[0]}: no such kit folder; pass --kits the folder 'consortium provision' wrote")
    installed = []
    for folder, source in targets:
        destination = folder / source.name
        if source is secret_path:
            _write_private(destination, source.read_bytes())
        else:
            atomic_write(destination, source.read_bytes())
        installed.append(destination)
    return installed


def verify_keys(
    kits: Path,
    *,
    config: ConsortiumConfig,
    sites: list[str] | None = None,
    fingerprint: str | None = None,
    workspace: Path | None = None,
) -> KeyReport:
    """Check the HE contexts in the kits; each failure names the file and what is wrong.

    The server kit must hold a public context only (and no client context at all); every member kit a
    secret context; all of them the same public key and parameters, and the scale of ``privacy.he``.
    Every file of the server kit (and of ``workspace``) that parses as a TenSEAL context is checked for
    a secret key, whatever its name or folder: a copy at ``local/backup.tenseal`` is found too.

    Parameters
    ----------
    sites
        Check only these kits (server host or member names), e.g. a member holding only its own kit.
    fingerprint
        The public fingerprint the contexts must have (from the audit log or ``he_context.json``);
        without it, the fingerprint most kits share is the reference.
    workspace
        The server's running workspace, searched for secret contexts like the server kit.
    """
    kits = Path(kits)
    report = KeyReport()
    wanted = set(sites) if sites is not None else None
    unknown = sorted((wanted or set()) - {config.operator.host, *(m.name for m in config.members)})
    if unknown:
        raise KeyCeremonyError(f"--site {unknown}: not the server ({config.operator.host}) or a member of the config")
    fingerprints: dict[Path, str] = {}
    if wanted is None or config.operator.host in wanted:
        _check_server(kits / config.operator.host / "startup", config, report, fingerprints)
        _search_secret_contexts(kits / config.operator.host, "server kit", report)
    if workspace is not None:
        if not Path(workspace).is_dir():
            raise KeyCeremonyError(f"--workspace {workspace}: no such folder; pass the server's workspace folder")
        _search_secret_contexts(Path(workspace), "server workspace", report)
    for member in config.members:
        if wanted is None or member.name in wanted:
            _check_member(kits / member.name / "startup" / CLIENT_CONTEXT, member.name, config, report, fingerprints)
    report.fingerprint = fingerprint or _majority(fingerprints)
    for path, found in fingerprints.items():
        if found != report.fingerprint:
            report.findings.append(
                Finding(
                    path,
                    f"a different key pair (public fingerprint {found[:16]}..., expected "
                    f"{report.fingerprint[:16]}...): encrypted updates would not add up",
                )
            )
    return report


def _check_server(startup: Path, config: ConsortiumConfig, report: KeyReport, fingerprints: dict) -> None:
    stray = startup / CLIENT_CONTEXT
    if stray.exists():
        report.findings.append(Finding(stray, "a secret (client) context in the operator's server kit: delete it"))
    server_file = startup / SERVER_CONTEXT
    context = _load(server_file, report)
    if context is None:
        return
    if context.is_private() or context.has_secret_key():
        report.findings.append(Finding(server_file, "holds a secret key: the operator could decrypt updates"))
    else:
        report.checked[config.operator.host] = "public"
    fingerprints[server_file] = public_fingerprint(context)


def _search_secret_contexts(folder: Path, where: str, report: KeyReport) -> None:
    """Parse every file under ``folder`` as a TenSEAL context; a finding for each one with a secret key."""
    reported = {f.path.resolve() for f in report.findings}
    for root, folders, names in os.walk(folder):  # symlinked folders are not followed: no loops
        folders.sort()
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file() or path.resolve() in reported:
                continue
            if path.stat().st_size > MAX_SCAN_BYTES:
                report.skipped.append(path)
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.findings.append(
                    Finding(path, f"unreadable ({exc.strerror}): cannot prove it holds no secret key")
                )
                continue
            report.scanned += 1
            try:
                context = ts.context_from(data)
            except Exception:  # tenseal raises bare exceptions on bytes that are not a context: not a key file
                continue
            if context.is_private() or context.has_secret_key():
                report.findings.append(
                    Finding(
                        path,
                        f"a secret HE context (secret key) in the operator's {where}: the operator could "
                        "decrypt every update; delete it (members keep the secret context, never the operator)",
                    )
                )
                reported.add(path.resolve())


def _check_member(path: Path, name: str, config: ConsortiumConfig, report: KeyReport, fingerprints: dict) -> None:
    context = _load(path, report)
    if context is None:
        return
    if not context.is_private():
        report.findings.append(Finding(path, "holds no secret key: this member could not decrypt"))
    else:
        report.checked[name] = "secret"
    fingerprints[path] = public_fingerprint(context)
    expected_scale = 2**config.privacy.he.global_scale_bits
    if context.global_scale != expected_scale:
        report.findings.append(
            Finding(path, f"global scale {context.global_scale:g} differs from privacy.he ({expected_scale:g})")
        )


def _load(path: Path, report: KeyReport) -> ts.Context | None:
    if not path.is_file():
        report.findings.append(Finding(path, "missing; run 'consortium keys install'"))
        return None
    try:
        return ts.context_from(path.read_bytes())
    except Exception as exc:  # tenseal raises bare exceptions on malformed bytes
        report.findings.append(Finding(path, f"not a TenSEAL context ({exc})"))
        return None


def _majority(fingerprints: dict[Path, str]) -> str | None:
    if not fingerprints:
        return None
    values = list(fingerprints.values())
    # the server's public context is the reference when there is no majority among members
    return max(dict.fromkeys(values), key=values.count)


def _check_key_files(secret_path: Path, public_path: Path) -> None:
    secret, public = load_context(secret_path), load_context(public_path)
    if not secret.is_private():
        raise KeyCeremonyError(f"{secret_path}: holds no secret key; it is not the custodian's secret context")
    if public.is_private() or public.has_secret_key():
        raise KeyCeremonyError(f"{public_path}: holds a secret key; it must never reach the operator's server")
    try:
        check_key_pair(secret, public)
    except ValueError:
        raise KeyCeremonyError(
            f"{secret_path.parent}: {secret_path.name} and {public_path.name} are not one key pair; recreate them"
        ) from None


def _manifest(he_settings: HomomorphicEncryption, fingerprint: str) -> dict:
    return {
        "scheme": "CKKS",
        "poly_modulus_degree": he_settings.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(he_settings.coeff_mod_bit_sizes),
        "global_scale_bits": he_settings.global_scale_bits,
        "galois_keys": False,
        "public_fingerprint_sha256": fingerprint,
        "files": {CLIENT_CONTEXT: "members only (secret key)", SERVER_CONTEXT: "operator's server (public)"},
    }


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o600)  # a new file each time: never an old file's wider mode
