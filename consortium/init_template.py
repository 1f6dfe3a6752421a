"""The commented ``consortium.yaml`` that ``consortium init`` writes.

The sections with defaults (``data``, ``training``, ``privacy``, ``tracking``) are written from the schema
itself: every field, its default and a comment (the field's description where the schema has one), so the
template never drifts from what :func:`schema.config.load_config` accepts. A field whose default is
``None`` is written commented out, with an example value.
"""

from __future__ import annotations

from string import ascii_lowercase
from typing import Any

import yaml
from pydantic import BaseModel

from schema.config import (
    DataContract,
    DifferentialPrivacy,
    HomomorphicEncryption,
    Operator,
    Panel,
    Tracking,
    Training,
)
from schema.statistics import Statistics

MAX_MEMBERS = len(ascii_lowercase)
COMMENT_COLUMN = 34

# Comments for fields the schema describes tersely or not at all; the schema's description otherwise.
COMMENTS = {
    "id_kind": "symbol (gene symbols) or ensembl (Ensembl IDs); one kind per member file",
    "min_coverage": "share of the panel a member's features must cover",
    "fl_port": "port the members' FLARE clients connect to",
    "admin_port": "port of the FLARE admin console (its own number)",
    "min_class_count": "labelled samples needed in each class of a binary task",
    "val_fraction": "share of each member's samples for validation (early stopping)",
    "test_fraction": "share of each member's samples held out for the test metrics",
    "split_seed": "seed of the stratified split ('consortium data split')",
    "rounds": "federated rounds",
    "local_epochs": "passes over a member's training data per round",
    "batch_size": "samples per gradient step",
    "learning_rate": "Adam's learning rate",
    "weight_decay": "L2 penalty",
    "trunk_widths": "hidden widths of the shared trunk (federated)",
    "dropout": "dropout in trunk and heads",
    "task_weights": "loss weight per task name, e.g. {response: 2.0}; default 1 each",
    "seed": "training seed",
    "poly_modulus_degree": "CKKS ring size: 4096, 8192 or 16384",
    "coeff_mod_bit_sizes": "CKKS primes; their sum must fit the ring (8192: at most 218 bits)",
    "global_scale_bits": "CKKS scale 2^bits; below the first prime",
    "epsilon": "DP budget over all planned rounds",
    "delta": "DP delta",
    "max_grad_norm": "per-sample gradient clipping norm",
    "experiment": "MLflow experiment name",
}
SECTION_ENABLED = {
    "he": "encrypted aggregation (TenSEAL CKKS): the server adds ciphertexts it cannot read",
    "dp": "DP-SGD with Opacus",
}
EXAMPLES = {  # shown, commented out, for fields that default to None
    "formula": "~ endpoint + age + sex",
    "by": "region",
    "folds": 5,
    "min_members": 2,
    "uri": "http://mlflow.example.org:5000",
}

HEADER = """\
# consortium.yaml: the single source of truth of a consortium (written by 'consortium init').
#
# Every member keeps a copy of this file; its own 'data' entry points at its own .h5ad file. Relative
# paths are relative to this file's folder. Sections after 'members' show their defaults: delete what
# you do not change. Check it and a member's data with
#   consortium data check --config consortium.yaml --member {first}
# and see 'consortium synth --out DIR' for a complete example with data.

name: {name}  # lower-case letters, digits, '-' or '_'

operator:  # the neutral party running the FLARE server; it holds no data and no HE secret key
"""

PANEL = """
panel:  # the feature panel every member's data is harmonized to
  file: panel.txt  # one feature identifier a line (or 'features: [TP53, EGFR, ...]' instead of 'file')
{rest}  # clinical:                     # obs columns as model inputs, after the panel's (without file/features: alone)
  #   - column: age
  #     type: numeric             # standardized with the training split's mean and SD
  #     range: [18, 100]          # a value outside is a contract error
  #     missing: indicator        # refuse (default: a missing value is an error) or indicator ('age (missing)')
  #   - column: sex
  #     type: categorical
  #     levels: [F, M]            # one 0/1 input per level ('sex=F', 'sex=M'), the same at every member
"""

MEMBER = """\
  - name: {name}                  # site name, also the FLARE client name
    org: {org}                  # letters, digits and '_' (written into certificates); one org per member
    data: data/{name}.h5ad        # AnnData: X samples x features, outcomes in obs, feature ids in var_names
    admin: lead@{name}.org        # e-mail of the member's lead (submits jobs)
    # layer: counts               # read X from this layer, or 'raw' for adata.raw (default: adata.X)
    # var_id_column: gene_ids     # match the panel against this var column (default: var_names)
    # symbol_column: gene_symbols # var column of display names (default: gene_symbols when present)
    # read: chunks                # read the matrix a block of rows at a time (default auto: when too big)
    tasks:                        # the same name and type at several members is one shared endpoint
      - name: response
        type: binary              # binary | regression | survival
        column: response          # obs column of 0/1 labels (missing labels allowed)
        # positive: responder     # with text labels: the value that means 1 (every other value is 0)
"""
MEMBER_EXAMPLES = """\
      # - name: overall_survival
      #   type: survival
      #   time: os_days           # obs column: follow-up time (> 0)
      #   event: os_event         # obs column: 1 = event, 0 = censored
      #   time_unit: days         # unit of the follow-up time, shown on the Kaplan-Meier plots
      # - name: tumour_size
      #   type: regression
      #   column: size_mm
"""


def render_template(*, members: int = 2, name: str = "my-consortium") -> str:
    """The text of a commented ``consortium.yaml`` with ``members`` placeholder members."""
    if not 1 <= members <= MAX_MEMBERS:
        raise ValueError(f"members={members}: give 1 to {MAX_MEMBERS}")
    names = [f"pharma-{letter}" for letter in ascii_lowercase[:members]]
    parts = [HEADER.format(name=name, first=names[0])]
    parts.append(_section(Operator, indent=1, values={"org": "Neutral_Operator"}, skip=()))
    panel_fields = _section(Panel, indent=1, skip=("features", "file", "clinical"))
    parts.append(PANEL.format(rest=panel_fields))
    parts.append("\ndata:  # what a member's data must satisfy to join a run\n")
    parts.append(_section(DataContract, indent=1))
    parts.append("\nmembers:\n")
    for index, member in enumerate(names):
        parts.append(MEMBER.format(name=member, org=f"Pharma_{ascii_lowercase[index].upper()}"))
        if index == 0:
            parts.append(MEMBER_EXAMPLES)
    parts.append("\ntraining:\n")
    parts.append(_section(Training, indent=1))
    parts.append("\nprivacy:\n  he:\n")
    parts.append(_section(HomomorphicEncryption, indent=2, section="he"))
    parts.append("  dp:\n")
    parts.append(_section(DifferentialPrivacy, indent=2, section="dp"))
    parts.append("\nstatistics:  # the design of the association statistics (limma, Cox); member is always in\n")
    parts.append(
        "  # covariates: {age: numeric, sex: [F, M]}  # obs columns; levels declared, the first is the reference\n"
    )
    parts.append(_section(Statistics, indent=1, skip=("covariates",)))
    parts.append("\ntracking:\n")
    parts.append(_section(Tracking, indent=1))
    return _align("".join(parts))


def _section(
    model: type[BaseModel],
    *,
    indent: int,
    values: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
    section: str | None = None,
) -> str:
    """One line per field of ``model``: ``key: default  # comment``; a None default commented out."""
    values = values or {}
    lines = []
    for key, info in model.model_fields.items():
        if key in skip or info.exclude:
            continue
        comment = SECTION_ENABLED.get(section or "") if key == "enabled" else COMMENTS.get(key)
        comment = comment or _lower_first((info.description or "").rstrip(".")) or None
        value = values.get(key, info.get_default(call_default_factory=True))
        prefix = "  " * indent
        if value is None:
            example = _scalar(EXAMPLES.get(key))
            lines.append(_with_comment(f"{prefix}# {key}: {example}", comment))
        else:
            lines.append(_with_comment(f"{prefix}{key}: {_scalar(value)}", comment))
    return "".join(line + "\n" for line in lines)


def _scalar(value: Any) -> str:
    """A value as YAML flow style on one line (lists as ``[a, b]``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _lower_first(text: str) -> str:
    """'Host name ...' -> 'host name ...', but 'MLflow ...' stays."""
    return text[:1].lower() + text[1:] if text[1:2].islower() or text[1:2] == "-" else text


def _with_comment(line: str, comment: str | None) -> str:
    return f"{line}  # {comment}" if comment else line


def _pad(text: str) -> str:
    return " " * max(2, COMMENT_COLUMN - len(text))


def _align(text: str) -> str:
    """Start every trailing comment at one column where the line leaves room."""
    out = []
    for line in text.splitlines():
        code, sep, comment = line.rpartition("  # ")
        if sep and code.strip():
            line = f"{code.rstrip()}{_pad(code.rstrip())}# {comment}"
        out.append(line)
    return "\n".join(out) + "\n"
