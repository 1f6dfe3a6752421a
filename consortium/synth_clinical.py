"""The clinical synthetic consortia ``consortium synth --kind trial|sites`` writes: members holding obs
columns only, the columns declared as model inputs (``panel.clinical``), shared endpoints, the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omics import synthetic_sites, synthetic_trial
from schema.config import config_from_dict, dump_config
from schema.errors import UserError

KINDS = ("biomarkers", "trial", "sites")
DEFAULT_SIZES = {"trial": synthetic_trial.DEFAULT_SIZES, "sites": synthetic_sites.DEFAULT_SIZES}
NAMES = {"trial": "dropout-consortium", "sites": "site-selection-consortium"}
MIN_SIZE = 100
# rounds written into consortium.yaml unless --rounds says otherwise: the sites' skewed rate needs more
# rounds before the federated ranking of sites matches the pooled one (5 rounds: Spearman 0.03 below it)
DEFAULT_ROUNDS = {"biomarkers": 5, "trial": 5, "sites": 10}
SCREENING_CAPACITY = (8.0, 20.0, 35.0, 12.0, 25.0)  # patients a month each trial member's sites can screen

# a small network suits some ten clinical inputs; the same settings for every arm of a comparison
TRAINING = {
    "trunk_widths": [32, 16],
    "head_width": 8,
    "dropout": 0.1,
    "learning_rate": 0.003,
    "batch_size": 32,
    "local_epochs": 2,
}


def synthesize_clinical(
    out: Path, *, kind: str, sizes: list[int], seed: int, rounds: int | None = None
) -> dict[str, Any]:
    """Write a clinical-only synthetic consortium of ``kind`` (``"trial"`` or ``"sites"``) into ``out``.

    Returns ``{"config": path, "ground_truth": path, "members": [{name, samples, file, current}]}``.
    """
    makers = {"trial": synthetic_trial.make_trial_consortium, "sites": synthetic_sites.make_sites_consortium}
    if kind not in makers:
        raise UserError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    if min(sizes) < MIN_SIZE:
        raise UserError(f"--sizes {','.join(map(str, sizes))}: every member of a {kind} consortium needs >= {MIN_SIZE}")
    out = Path(out).resolve()  # the config's paths are written relative to its own folder
    try:
        synthetic = makers[kind](out, sizes=sizes, seed=seed)
    except ValueError as exc:
        raise UserError(f"consortium synth --kind {kind}: {exc}") from None
    raw: dict[str, Any] = {
        "name": NAMES[kind],
        "operator": {"org": "Neutral_Operator", "host": "localhost", "admin": "admin@operator.org"},
        "panel": {"clinical": synthetic.clinical},
        "members": [
            {
                "name": m.name,
                "org": m.org,
                "data": str(m.path),
                "admin": f"lead@{m.name}.org",
                "tasks": m.tasks,
                **({"region": m.region} if m.region else {}),
            }
            for m in synthetic.members
        ],
        "training": {"rounds": rounds or DEFAULT_ROUNDS[kind], "seed": seed, **TRAINING},
    }
    if kind == "trial":
        # the same patients serve a protocol's feasibility count and its enrollment forecast
        capacity = dict(zip([m.name for m in synthetic.members], SCREENING_CAPACITY, strict=False))
        raw["feasibility"] = {"screening_capacity": capacity, "consent_rate": 0.6, "target": 150}
    if kind == "sites":
        # up to one site in nine enrolls no patient: a small sponsor holds fewer than the default 25
        raw["data"] = {"min_class_count": 10}
    config_path = out / "consortium.yaml"
    dump_config(config_from_dict(raw, source=config_path), config_path)
    return {
        "config": str(config_path),
        "ground_truth": str(synthetic.ground_truth_path),
        "members": [
            {"name": m.name, "samples": m.n_samples, "file": str(m.path), "current": str(m.current)}
            for m in synthetic.members
        ],
    }
