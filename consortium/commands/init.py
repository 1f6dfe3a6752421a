"""``consortium init``: write a commented ``consortium.yaml`` template to fill in."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.text import Text

from consortium.console import Console
from schema.errors import UserError

console = Console()


def write_template(out: Path, *, members: int, force: bool) -> Path:
    """Write the template to ``out`` (refusing to replace a file unless ``force``), checked by the schema."""
    from consortium.init_template import render_template
    from schema.config import config_from_dict

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file path such as {out / 'consortium.yaml'}")
    if out.exists() and not force:
        raise UserError(f"--out {out}: already exists; choose another path, or pass --force to overwrite it")
    text = render_template(members=members)
    config_from_dict(yaml.safe_load(text), source=out)  # the template itself must be valid: fail here, not later
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def set_operator_ports(config_path: Path, ports: str | None) -> None:
    """Write ``ports`` (``"FL,ADMIN"``, e.g. ``"9102,9103"``) into ``operator.fl_port`` and
    ``operator.admin_port`` of the consortium.yaml at ``config_path``; ``None`` leaves the file as it is.

    For a consortium the command wrote itself (the demo's): the file is rewritten without comments."""
    from schema.config import config_from_dict

    if not ports:
        return
    try:
        fl_port, admin_port = (int(part) for part in ports.split(","))
    except ValueError:
        raise UserError(f"--ports '{ports}': give the FL and admin ports as two numbers, e.g. 9102,9103") from None
    raw = yaml.safe_load(Path(config_path).read_text())
    if (raw["operator"].get("fl_port"), raw["operator"].get("admin_port")) == (fl_port, admin_port):
        return
    raw["operator"] |= {"fl_port": fl_port, "admin_port": admin_port}
    config_from_dict(raw, source=Path(config_path))  # a port out of range or twice is refused, named, here
    Path(config_path).write_text(yaml.safe_dump(raw, sort_keys=False))


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(
        out: Path = typer.Option(Path("consortium.yaml"), "--out", "-o", help="The file to write.", dir_okay=False),
        members: int = typer.Option(2, "--members", min=1, max=26, help="Placeholder members to write."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Write a commented consortium.yaml template (every setting with its default) to fill in."""
        path = write_template(out, members=members, force=force)
        if as_json:
            typer.echo(json.dumps({"config": str(path), "members": members}))
            return
        console.print(Text(f"wrote {path} ({members} members); fill in the operator, panel and members, then:"))
        console.print(Text(f"  consortium data check --config {path} --member pharma-a"))
