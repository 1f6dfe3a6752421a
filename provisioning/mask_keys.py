"""The mask-key ceremony (secure aggregation, issue 26): each member's X25519 key pair, made in its own kit.

Pairwise masks (:mod:`jobs.he.masks`) need a private key in every member kit and every member's public
key beside it. On provisioned kits each member, on its own machine, runs :func:`create_member_mask_key`
on its kit (``consortium keys masks --kit KITS/<member> --public DIR``):

- its private key goes to ``<kit>/startup/mask_key.x25519`` (mode 0600) and never leaves the kit;
- its public key goes to ``DIR/<member>.maskpub.json`` (name, key, fingerprint): a small file the member
  hands on to every other member (public keys are no secret, but each member compares the printed
  fingerprints with the others' over a second channel, so that nobody slips in a key of its own);
- once ``DIR`` holds every member's file, :func:`install_public_keys` writes the list
  (``startup/mask_public_keys.json``), the same in every member kit.

:func:`ceremony_on_one_machine` plays every member on a folder holding every member kit, for POC, tests
and demos only: whoever runs it has made every member's private key, which on real kits only the member
itself may do. :func:`verify_masks` checks the kits (``consortium keys verify``): the operator's server
kit and workspace hold no member's private key, whatever its file name; each member kit's private key
is the one the list names; every member kit holds the same list; every member of the config is in it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jobs.he.mask_files import FIX, create_member_key, fingerprints, read_public_keys, write_public_keys
from jobs.he.masks import key_fingerprint, load_private_key, public_bytes
from provisioning.errors import KeyCeremonyError
from provisioning.he_keys import Finding, raise_for_findings
from schema.config import ConsortiumConfig
from schema.names import MASK_KEY_FILE, MASK_PUBLIC_KEYS_FILE
from schema.writes import atomic_write

PUBLIC_FILE_SUFFIX = ".maskpub.json"
PUBLIC_FILE_VERSION = "consortium-mask-public/1"
KEY_BYTES = 32


@dataclass(frozen=True)
class MemberKey:
    """One member's mask key as :func:`create_member_mask_key` left it."""

    member: str
    private_key: Path
    public_key: bytes
    created: bool
    """False where the kit held a key already (kept: the other members' lists name it)."""
    public_file: Path | None = None

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)


@dataclass
class Ceremony:
    """What :func:`member_ceremony` or :func:`ceremony_on_one_machine` did: the keys made or found, the
    lists installed."""

    keys: list[MemberKey]
    installed: list[Path]
    fingerprints: dict[str, str]
    """sha256 of each public key gathered so far, by member."""
    missing: list[str] = field(default_factory=list)
    """Members whose public key is not at hand yet: nothing was installed."""


@dataclass
class MaskReport:
    """The outcome of :func:`verify_masks`."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    """sha256 of each member's public key, from the list most member kits share."""
    checked: list[str] = field(default_factory=list)
    """Member kits whose private key is the one the list names."""
    findings: list[Finding] = field(default_factory=list)
    scanned: int = 0
    """Files of the server kit (and workspace) looked at for a member's private key."""

    @property
    def ok(self) -> bool:
        return not self.findings

    def raise_for_failure(self) -> None:
        raise_for_findings(self.findings, what="mask key verification")


def kit_member(kit: Path, *, config: ConsortiumConfig) -> str:
    """The member whose kit ``kit`` is (kits are named after their site, as ``consortium provision`` writes them)."""
    kit = Path(kit)
    names = [m.name for m in config.members]
    if kit.name == config.operator.host:
        raise KeyCeremonyError(
            f"--kit {kit}: the operator's server kit; mask keys are made in member kits only, by each member"
        )
    if kit.name not in names:
        raise KeyCeremonyError(
            f"--kit {kit}: '{kit.name}' is not a member of {config.source}; give a member's kit, "
            f"KITS/<member> ({', '.join(names)})"
        )
    if not (kit / "startup").is_dir():
        raise KeyCeremonyError(f"--kit {kit}: no startup/ folder; give the member kit 'consortium provision' wrote")
    return kit.name


def create_member_mask_key(kit: Path, *, config: ConsortiumConfig, public_dir: Path | None = None) -> MemberKey:
    """Make the member's key pair in its ``kit`` (kept if it has one) and, with ``public_dir``, write its
    public file there for the member to hand on. Run by the member itself, on its own machine."""
    member = kit_member(kit, config=config)
    startup = Path(kit) / "startup"
    path = startup / MASK_KEY_FILE
    existed = path.is_file()
    try:
        public = create_member_key(startup)
    except ValueError as exc:  # a damaged key file: only its owner may decide to replace it
        raise KeyCeremonyError(
            f"{exc}. If it is damaged, delete {path} and run 'consortium keys masks' again: a new key means "
            "every member installs the list again"
        ) from None
    written = write_public_file(public_dir, member, public) if public_dir is not None else None
    return MemberKey(member, path, public, created=not existed, public_file=written)


def write_public_file(folder: Path, member: str, public: bytes) -> Path:
    """``folder/<member>.maskpub.json``: the member's public key, to hand on. A file there naming another
    key is refused (an old key of the member, or someone else's)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KeyCeremonyError(f"--public {folder}: is a file; give a folder for the public key files")
    path = folder / f"{member}{PUBLIC_FILE_SUFFIX}"
    if path.exists():
        found, key = read_public_file(path)
        if found == member and key == public:
            return path
        raise KeyCeremonyError(
            f"{path}: names another public key than the private key in {member}'s kit ({key_fingerprint(key)[:16]}... "
            f"vs {key_fingerprint(public)[:16]}...); if it is an old key of yours, delete the file and run this again"
        )
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "version": PUBLIC_FILE_VERSION,
        "member": member,
        "public_key": public.hex(),
        "fingerprint_sha256": key_fingerprint(public),
    }
    return atomic_write(path, json.dumps(document, indent=2) + "\n")


def read_public_file(path: Path) -> tuple[str, bytes]:
    """The member and its raw public key from a ``<member>.maskpub.json``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        if document.get("version") != PUBLIC_FILE_VERSION:
            raise ValueError(f"version {document.get('version')!r}, expected {PUBLIC_FILE_VERSION!r}")
        member, key = str(document["member"]), bytes.fromhex(str(document["public_key"]))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise KeyCeremonyError(
            f"{path}: not a public mask key file ({exc}); ask its member for a new copy ('consortium keys masks')"
        ) from None
    if len(key) != KEY_BYTES:
        raise KeyCeremonyError(
            f"{path}: a public key of {len(key)} bytes, not {KEY_BYTES}; ask its member for a new copy"
        )
    if document.get("fingerprint_sha256", key_fingerprint(key)) != key_fingerprint(key):
        raise KeyCeremonyError(
            f"{path}: its fingerprint is not that of its key (altered?); ask its member for a new copy"
        )
    if path.name != f"{member}{PUBLIC_FILE_SUFFIX}":
        raise KeyCeremonyError(f"{path}: holds the key of '{member}'; name it {member}{PUBLIC_FILE_SUFFIX}")
    return member, key


def read_public_files(folder: Path, *, config: ConsortiumConfig) -> dict[str, bytes]:
    """Every member's public key from the ``*.maskpub.json`` files in ``folder`` (some may be missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KeyCeremonyError(
            f"--public {folder}: no such folder; give the folder holding the members' {PUBLIC_FILE_SUFFIX} files"
        )
    names = {m.name for m in config.members}
    keys = {}
    for path in sorted(folder.glob(f"*{PUBLIC_FILE_SUFFIX}")):
        member, key = read_public_file(path)
        if member not in names:
            raise KeyCeremonyError(
                f"{path}: '{member}' is not a member of {config.source}; remove the file, or add the member first"
            )
        keys[member] = key
    return keys


def gather_public_keys(
    config: ConsortiumConfig, *, found: dict[str, bytes], public_dir: Path | None
) -> tuple[dict[str, bytes], list[str]]:
    """Every member's public key, from member kits at hand (``found``) and the files in ``public_dir``;
    also the members still missing. A kit and a file naming different keys for one member is refused."""
    keys = dict(found)
    if public_dir is not None:
        for member, key in read_public_files(public_dir, config=config).items():
            if member in keys and keys[member] != key:
                raise KeyCeremonyError(
                    f"{Path(public_dir) / (member + PUBLIC_FILE_SUFFIX)}: not the public key of the private key in "
                    f"{member}'s kit; delete the stale file and run 'consortium keys masks' again"
                )
            keys[member] = key
    missing = [m.name for m in config.members if m.name not in keys]
    return {m.name: keys[m.name] for m in config.members if m.name in keys}, missing


def install_public_keys(startups: list[Path], public_keys: dict[str, bytes], *, config: ConsortiumConfig) -> list[Path]:
    """Write the list into each member kit's ``startup/``; every member of the config must be in it."""
    missing = [m.name for m in config.members if m.name not in public_keys]
    if missing:
        raise KeyCeremonyError(
            f"no public mask key for {missing}: each of them runs 'consortium keys masks --kit KITS/<member> "
            "--public DIR' and hands on DIR/<member>.maskpub.json; install once every member's file is there"
        )
    return [write_public_keys(Path(startup), public_keys) for startup in startups]


def member_ceremony(kit: Path, *, config: ConsortiumConfig, public_dir: Path) -> Ceremony:
    """A member's part on its own ``kit``: its key made (or kept), its public file written to ``public_dir``,
    and, once ``public_dir`` holds every member's file, the list installed into the kit."""
    key = create_member_mask_key(kit, config=config, public_dir=public_dir)
    public_keys, missing = gather_public_keys(config, found={key.member: key.public_key}, public_dir=public_dir)
    installed = [] if missing else install_public_keys([Path(kit) / "startup"], public_keys, config=config)
    return Ceremony([key], installed, fingerprints(public_keys), missing)


def ceremony_on_one_machine(kits: Path, *, config: ConsortiumConfig, public_dir: Path | None = None) -> Ceremony:
    """Every member's part, for the member kits found under ``kits`` (``KITS/<member>/startup``): a key made
    where one is missing, then the list installed into each. Members whose kit is elsewhere contribute
    their public file in ``public_dir``, where the kits found write theirs.

    For POC, tests and demos only: on one machine every private key is made by whoever runs this, which on
    real kits only each member may do (:func:`create_member_mask_key` on its own kit).
    """
    kits = Path(kits)
    present = [m.name for m in config.members if (kits / m.name / "startup").is_dir()]
    if not present:
        raise KeyCeremonyError(
            f"--kits {kits}: no member kit here (<member>/startup for {', '.join(m.name for m in config.members)}); "
            "pass the folder 'consortium provision' wrote"
        )
    made = [create_member_mask_key(kits / name, config=config, public_dir=public_dir) for name in present]
    public_keys, missing = gather_public_keys(
        config, found={k.member: k.public_key for k in made}, public_dir=public_dir
    )
    if missing:
        where = f"in {public_dir}" if public_dir is not None else "(pass --public DIR with their files)"
        raise KeyCeremonyError(
            f"--kits {kits}: no kit and no public mask key file {where} for {missing}; each of them runs "
            "'consortium keys masks --kit KITS/<member> --public DIR' on its own kit and hands on its file"
        )
    installed = install_public_keys([kits / name / "startup" for name in present], public_keys, config=config)
    return Ceremony(made, installed, fingerprints(public_keys))


def list_fingerprints(startup: Path) -> dict[str, str] | None:
    """The members' fingerprints from the list in ``startup`` (a member kit's), or ``None`` where it has
    none that reads: what a job's audit entry records."""
    try:
        return fingerprints(read_public_keys(Path(startup) / MASK_PUBLIC_KEYS_FILE))
    except ValueError:
        return None


def verify_masks(
    kits: Path, *, config: ConsortiumConfig, sites: list[str] | None = None, workspace: Path | None = None
) -> MaskReport:
    """Check the mask keys in the kits; each finding names the file and the fix.

    ``sites``: only these kits (server host or member names), e.g. a member holding only its own kit.
    ``workspace``: the server's running workspace, searched like its kit. In the operator's folders, a
    file named ``mask_key.x25519``, and any 32-byte file whose public key is a member's, is a finding.
    """
    kits, report = Path(kits), MaskReport()
    wanted = set(sites) if sites is not None else None
    unknown = sorted((wanted or set()) - {config.operator.host, *(m.name for m in config.members)})
    if unknown:
        raise KeyCeremonyError(f"--site {unknown}: not the server ({config.operator.host}) or a member of the config")
    if workspace is not None and not Path(workspace).is_dir():
        raise KeyCeremonyError(f"--workspace {workspace}: no such folder; pass the server's workspace folder")
    lists: dict[Path, dict[str, bytes]] = {}  # the checked member kits' lists
    known: list[dict[str, bytes]] = []  # every list at hand: what the server's search looks for
    for member in config.members:
        startup = kits / member.name / "startup"
        if wanted is None or member.name in wanted:
            public_keys = _check_member(startup, member.name, config, report)
            if public_keys is not None:
                lists[startup / MASK_PUBLIC_KEYS_FILE] = public_keys
                known.append(public_keys)
        elif startup.is_dir():
            with contextlib.suppress(ValueError):
                known.append(read_public_keys(startup / MASK_PUBLIC_KEYS_FILE))
    reference = _check_same_lists(lists, report)
    report.fingerprints = fingerprints(reference)
    owners = {key: name for keys in known for name, key in keys.items()}
    if wanted is None or config.operator.host in wanted:
        _search_private_keys(kits / config.operator.host, "server kit", owners, report)
    if workspace is not None:
        _search_private_keys(Path(workspace), "server workspace", owners, report)
    return report


def _check_member(startup: Path, name: str, config: ConsortiumConfig, report: MaskReport) -> dict[str, bytes] | None:
    """Check one member kit's key and list; returns the list where it reads."""
    key_path, list_path = startup / MASK_KEY_FILE, startup / MASK_PUBLIC_KEYS_FILE
    redo = f"run 'consortium keys masks --kit KITS/{name}' at the member, then install the list again"
    before = len(report.findings)
    public_keys = None
    try:
        public_keys = read_public_keys(list_path)
    except ValueError as exc:
        report.findings.append(Finding(list_path, _problem(exc, list_path)))
    missing = [m.name for m in config.members if public_keys is not None and m.name not in public_keys]
    if missing:
        report.findings.append(
            Finding(list_path, f"no public mask key for {missing}: masks with them could not cancel; {FIX}")
        )
    public = _member_public_key(key_path, redo, report)
    if public is not None and public_keys is not None and name in public_keys and public_keys[name] != public:
        report.findings.append(
            Finding(
                key_path,
                f"not the key {MASK_PUBLIC_KEYS_FILE} names for '{name}' ({key_fingerprint(public)[:16]}... vs "
                f"{key_fingerprint(public_keys[name])[:16]}...): its masks would not cancel; install the list made "
                "from this kit's public key",
            )
        )
    if len(report.findings) == before:
        report.checked.append(name)
    return public_keys


def _member_public_key(key_path: Path, redo: str, report: MaskReport) -> bytes | None:
    if not key_path.is_file():
        report.findings.append(Finding(key_path, f"missing: this member cannot mask; {redo}"))
        return None
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        report.findings.append(Finding(key_path, f"mode {mode:o}: others may read it; chmod 600 {key_path}"))
    try:
        return public_bytes(load_private_key(key_path.read_bytes(), source=str(key_path)))
    except ValueError as exc:
        report.findings.append(Finding(key_path, f"{_problem(exc, key_path)}; {redo}"))
        return None


def _check_same_lists(lists: dict[Path, dict[str, bytes]], report: MaskReport) -> dict[str, bytes]:
    """The list most member kits hold; a finding for each kit holding another."""
    if not lists:
        return {}
    canonical = {path: json.dumps({n: k.hex() for n, k in sorted(keys.items())}) for path, keys in lists.items()}
    common, _ = Counter(canonical.values()).most_common(1)[0]
    reference = next(lists[path] for path, text in canonical.items() if text == common)
    for path, text in canonical.items():
        if text != common:
            differ = sorted(n for n in {*lists[path], *reference} if lists[path].get(n) != reference.get(n))
            report.findings.append(
                Finding(
                    path,
                    f"not the list the other member kits hold (keys of {differ} differ): pairwise masks would not "
                    f"cancel; install the same list into every member kit ({FIX})",
                )
            )
    return reference


def _search_private_keys(folder: Path, where: str, owners: dict[bytes, str], report: MaskReport) -> None:
    """A finding for each file under ``folder`` named like a mask key, or of 32 bytes whose public key is a
    member's (a renamed copy): an operator holding a member's key is that member's colluder already."""
    for root, folders, names in os.walk(folder):  # symlinked folders are not followed: no loops
        folders.sort()
        for file_name in sorted(names):
            path = Path(root) / file_name
            if not path.is_file():
                continue
            report.scanned += 1
            owner = None
            if path.stat().st_size == KEY_BYTES:
                try:
                    owner = owners.get(public_bytes(load_private_key(path.read_bytes())))
                except (OSError, ValueError):
                    owner = None
            if owner is not None or file_name.startswith(MASK_KEY_FILE):
                whose = f"the private mask key of '{owner}'" if owner is not None else "a private mask key"
                report.findings.append(
                    Finding(
                        path,
                        f"{whose} in the operator's {where}: mask keys stay in their member's "
                        "kit; delete it here (and, if it is a member's, that member makes a new key: "
                        "'consortium keys masks')",
                    )
                )


def _problem(exc: Exception, path: Path) -> str:
    """An error's message without the path a finding already names."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
