"""What ``provision``, ``add-member`` and ``keys`` share: their options, and the signed audit log each party
appends to (see :mod:`consortium.commands.provisioning` for whose log is whose)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from consortium.console import Console

if TYPE_CHECKING:
    from consortium.audit import AuditLog

AUDIT_FILE = "audit.jsonl"
SIGNING_KEY_FILE = "audit.key"

console = Console()
err_console = Console(stderr=True)

CONFIG_OPTION = typer.Option(..., "--config", "-c", help="The consortium.yaml file.", dir_okay=False)
AUDIT_OPTION = typer.Option(None, "--audit", help="Audit log to append to (default: audit.jsonl in the output folder).")
SIGNING_KEY_OPTION = typer.Option(
    None,
    "--signing-key",
    help="Your private audit signing key (made on first use). Default: audit.key in <kits>.operator/ for the "
    "operator, in <keys>.custodian/ for the key custodian: beside the folder you hand over, never inside it.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print the result as one JSON object (notes go to stderr).")


def notes(as_json: bool) -> Console:
    return err_console if as_json else console


def open_log(
    log: Path, key: Path, *, kits: Path | None, follows: tuple[Path | None, ...] = (), as_json: bool = False
) -> AuditLog:
    """The writer's log, before the command changes anything: a key inside the kits folder is refused, a
    key an older version left beside the log is moved to ``key``, and a log whose key is missing fails
    here rather than after the work is done. ``follows``: folders whose logs' heads the first entry records."""
    from consortium.audit import AuditLog
    from consortium.audit.chain import links_to
    from consortium.audit.signing import usage_error

    log, key = Path(log).resolve(), Path(key).resolve()
    if kits is not None and key.is_relative_to(Path(kits).resolve()):
        raise usage_error(
            f"--signing-key {key}: lies inside the kits folder {kits}, which is handed to the key custodian and "
            "the members; whoever holds it could sign entries as you. Keep it outside the kits (leave out "
            "--signing-key for the default, beside the folder)"
        )
    legacy = log.with_name(log.name + ".key")
    if legacy.is_file() and not key.exists():
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(legacy, key)
        notes(as_json).print(
            Text(
                f"moved the signing key of {log} from beside it ({legacy}) to {key}, out of the folder you hand "
                "over. If that folder left your hands with the key in it, start a new log with a new key"
            )
        )
    if log.is_file() and log.stat().st_size > 0 and not key.exists():
        raise usage_error(
            f"{log} is signed with a key that is not at {key}: pass --signing-key with the key its writer keeps "
            "(a new key would not match its signed entries), or --audit with a new log"
        )
    return AuditLog(log, key_path=key, follows=links_to(*follows))


def record(log: AuditLog, event: str, *, as_json: bool = False, **details) -> None:
    """Append to the audit log; on a new log, say where its signing key is and what to record elsewhere."""
    from consortium.audit import key_fingerprint, load_public_key

    if log.append(event, **details)["index"] == 0:
        fingerprint = key_fingerprint(load_public_key(log.public_key_path))
        notes(as_json).print(
            Text(
                f"new audit log {log.path}: signed with {log.key_path} (keep it private; never ship it). Record "
                f"its public key {log.public_key_path} or fingerprint {fingerprint} elsewhere, and verify "
                "against that copy"
            )
        )


def operator_key(kits: Path) -> Path:
    from provisioning.kits import operator_folder

    return operator_folder(kits) / SIGNING_KEY_FILE


def custodian_key(keys: Path) -> Path:
    from provisioning.he_keys import custodian_folder

    return custodian_folder(keys) / SIGNING_KEY_FILE


def echo_json(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2))
