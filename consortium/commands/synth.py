"""``consortium synth``: a synthetic consortium with planted biomarkers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from consortium.console import Console
from schema.errors import UserError

console = Console()


def synthesize(
    out: Path, *, sizes: list[int], n_features: int, seed: int, rounds: int = 5, shared: tuple[str, ...] = ()
) -> Path:
    """Write a synthetic consortium into ``out``; return the path of its consortium.yaml. ``shared``: the
    endpoints every member holds under one name (:func:`omics.synthetic.make_consortium`)."""
    from omics.synthetic import make_consortium
    from schema.config import config_from_dict, dump_config

    out = Path(out).resolve()  # the config's paths are written relative to its own folder
    try:
        synthetic = make_consortium(out, sizes=sizes, n_features=n_features, seed=seed, shared=shared)
    except ValueError as exc:
        raise UserError(f"consortium synth: {exc}") from None
    panel_path = out / "panel.txt"
    panel_path.write_text("\n".join(synthetic.panel) + "\n")
    raw = {
        "name": "synthetic-consortium",
        "operator": {"org": "Neutral_Operator", "host": "localhost", "admin": "admin@operator.org"},
        "panel": {"file": str(panel_path), "id_kind": "symbol", "min_coverage": 0.8},
        "members": [
            {"name": m.name, "org": m.org, "data": str(m.path), "admin": f"lead@{m.name}.org", "tasks": m.tasks}
            for m in synthetic.members
        ],
        "training": {"rounds": rounds, "seed": seed},
        # every synthetic member records age and sex: the statistics adjust for them (limma's design)
        "statistics": {"covariates": {"age": "numeric", "sex": ["F", "M"]}},
    }
    config_path = out / "consortium.yaml"
    dump_config(config_from_dict(raw, source=config_path), config_path)
    return config_path


def check_out_folder(out: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that is a file, cannot be written, or already holds files (unless ``force``).

    Checked before anything is written, so a refused run leaves the disk as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the synthetic consortium (created if absent)")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not force:
            shown = ", ".join(present[:5]) + (f", ... ({len(present)} in all)" if len(present) > 5 else "")
            raise UserError(
                f"--out {out}: already holds {shown}; choose a new or empty folder, or pass --force to "
                "overwrite the synthetic consortium's files in it"
            )
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable; choose a folder you can write")


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        out: Path = typer.Option(
            ..., "--out", help="Folder to write consortium.yaml, the .h5ad files and ground_truth.json."
        ),
        kind: str = typer.Option(
            "biomarkers",
            "--kind",
            help="biomarkers (omics, planted genes), trial (patients' dropout, planted drivers) or sites "
            "(sponsors' trial sites, planted enrollment effects); trial and sites are clinical-only members.",
        ),
        members: int = typer.Option(3, "--members", min=1, max=26, help="Number of members."),
        sizes: str = typer.Option(
            None,
            "--sizes",
            help="Samples per member, comma-separated (default 300,800,2000; trial 250,700,1400; sites 200,500,1000).",
        ),
        features: int = typer.Option(2000, "--features", min=96, help="Panel size."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same consortium."),
        rounds: int = typer.Option(
            None, "--rounds", min=1, help="Federated rounds written into consortium.yaml (default 5; sites 10)."
        ),
        force: bool = typer.Option(False, "--force", help="Write into a folder that already holds files."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Synthesize a consortium whose truth is known (written to ground_truth.json): planted biomarkers,
        or with --kind trial / sites, planted dropout drivers or enrollment effects."""
        from consortium.synth_clinical import KINDS

        if kind not in KINDS:
            raise UserError(f"--kind {kind}: use one of {', '.join(KINDS)}")
        counts = _parse_sizes(sizes, members, kind=kind)
        check_out_folder(out, force=force)
        progress = Console(stderr=True) if as_json else console  # stdout holds only the JSON
        with progress.status("synthesizing members..."):
            try:
                result = _write(out, kind=kind, sizes=counts, n_features=features, seed=seed, rounds=rounds)
            except OSError as exc:
                raise UserError(
                    f"--out {out}: cannot write {exc.filename} ({exc.strerror}); choose another folder"
                ) from None
        if as_json:
            typer.echo(json.dumps(result))
            return
        table = Table(title=Text(f"synthetic consortium in {out}"))
        columns = ("member", "samples", "file", "current") if kind != "biomarkers" else ("member", "samples", "file")
        for column in columns:
            table.add_column(column)
        for row in result["members"]:
            table.add_row(row["name"], str(row["samples"]), *(row[c] for c in columns[2:]))
        console.print(table)
        console.print(f"config: {result['config']}\nground truth: {result['ground_truth']}")


def _write(out: Path, *, kind: str, sizes: list[int], n_features: int, seed: int, rounds: int | None) -> dict:
    """Write the consortium of ``kind``; its config, ground truth and members (name, samples, file)."""
    if kind != "biomarkers":
        from consortium.synth_clinical import synthesize_clinical

        return synthesize_clinical(out, kind=kind, sizes=sizes, seed=seed, rounds=rounds)
    config_path = synthesize(out, sizes=sizes, n_features=n_features, seed=seed, rounds=rounds or 5)
    members = [
        {"name": name, "samples": n, "file": str(out / f"{name}.h5ad")}
        for name, n in zip([f"pharma-{chr(97 + i)}" for i in range(len(sizes))], sizes, strict=True)
    ]
    return {"config": str(config_path), "ground_truth": str(out / "ground_truth.json"), "members": members}


def _parse_sizes(sizes: str | None, members: int, *, kind: str = "biomarkers") -> list[int]:
    if sizes is None:
        from consortium.synth_clinical import DEFAULT_SIZES as CLINICAL_SIZES
        from omics.synthetic import DEFAULT_SIZES

        default = list(CLINICAL_SIZES.get(kind, DEFAULT_SIZES))
        return (default * members)[:members] if members != len(default) else default
    try:
        counts = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes '{sizes}': give whole numbers separated by commas, e.g. 300,800,2000") from None
    if any(c < 60 for c in counts):
        raise UserError(f"--sizes '{sizes}': every member needs at least 60 samples")
    return counts
