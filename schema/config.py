"""The ``consortium.yaml`` schema: the single source of truth for a consortium.

Parsed once by :func:`load_config`; every command and every FLARE site reads the same typed object.
Relative paths in the file are resolved against the file's own folder, so a consortium folder can be
moved as a whole.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schema.clinical import ClinicalFeature, input_names
from schema.errors import ConfigError
from schema.feasibility import Feasibility
from schema.statistics import Statistics
from schema.tracking import sqlite_under, tracking_store, without_credentials

_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
_SITE_NAME_FIX = "use lower-case letters, digits, '-' or '_', starting with a letter (for example 'pharma-a')"
_ORG = r"^[A-Za-z0-9_]+$"  # what NVFlare's provisioner accepts in a certificate's organisation
_ORG_FIX = "NVFlare allows only letters, digits and '_' in an org (for example 'Pharma_A')"
_EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
_EMAIL_FIX = "give an e-mail address such as 'lead@pharma-a.com': NVFlare names admin users by e-mail"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Operator(_Strict):
    """The neutral party that runs the FLARE server; it never holds data, heads or HE secret keys."""

    org: str = Field(pattern=_ORG, description="Organisation of the operator, written into the server's certificate.")
    host: str = Field(default="localhost", description="Host name every member's client connects to.")
    fl_port: int = Field(default=8102, ge=1024, le=65535)
    admin_port: int = Field(default=8103, ge=1024, le=65535)
    admin: str = Field(default="admin@operator.org", pattern=_EMAIL, description="E-mail of the operator's admin.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> Operator:
        if self.fl_port == self.admin_port:
            raise ValueError(
                f"fl_port and admin_port are both {self.fl_port}; give the admin port its own number "
                f"(for example {self.fl_port + 1})"
            )
        return self


class Panel(_Strict):
    """The consortium's model inputs: the omics feature panel every member's data is harmonized to, and
    the clinical obs columns beside it (:mod:`schema.clinical`); either may be absent, not both."""

    features: list[str] | None = Field(default=None, description="Feature identifiers, in panel order.")
    file: Path | None = Field(default=None, description="Text file with one feature identifier a line.")
    id_kind: Literal["symbol", "ensembl"] = "symbol"
    min_coverage: float = Field(default=0.8, gt=0.0, le=1.0)
    clinical: list[ClinicalFeature] = Field(
        default_factory=list,
        description="obs columns used as model inputs after the omics features (numeric, or categorical with "
        "declared levels); with them, 'features' and 'file' may be left out (a clinical-only consortium).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Panel:
        if self.features is not None and self.file is not None:
            raise ValueError("give the panel either 'features' (a list) or 'file' (one identifier a line), not both")
        if self.features is None and self.file is None and not self.clinical:
            raise ValueError(
                "give the panel 'features' (a list), 'file' (one identifier a line) or 'clinical' (obs columns "
                "as model inputs)"
            )
        _no_duplicates([c.column for c in self.clinical], "panel.clinical[].column")
        if self.features is not None:
            _no_clash(self.features, input_names(self.clinical), source="panel.features")
        return self


class BinaryTask(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["binary"]
    column: str = Field(description="obs column holding the labels (missing labels allowed).")
    positive: str | int | float | bool | None = Field(
        default=None,
        description="The label that means 1 (the others mean 0); needed for text labels. Without it: 0/1.",
    )


class RegressionTask(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["regression"]
    column: str = Field(description="obs column holding a numeric target.")


class SurvivalTask(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    type: Literal["survival"]
    time: str = Field(description="obs column holding the follow-up time (> 0).")
    event: str = Field(description="obs column holding the event indicator (1 = event, 0 = censored).")
    time_unit: str | None = Field(
        default=None,
        description="Unit of the follow-up time (e.g. days, months), shown on the plots' time axis; the same at "
        "every member holding the endpoint. Unset: the axis says the unit is not stated (no guess).",
    )


Task = Annotated[BinaryTask | RegressionTask | SurvivalTask, Field(discriminator="type")]


def task_columns(task: Task) -> list[str]:
    """The obs columns a task reads."""
    return [task.time, task.event] if task.type == "survival" else [task.column]


class Member(_Strict):
    """One pharma member: one FLARE client site, its data file and the tasks it owns."""

    name: Annotated[str, Field(pattern=_NAME, description="Site name; also the FLARE client name.")]
    org: str = Field(pattern=_ORG, description="Organisation, written into the member's certificates.")
    data: Path = Field(description="The member's AnnData file (.h5ad), resolved relative to consortium.yaml.")
    admin: str | None = Field(default=None, pattern=_EMAIL, description="E-mail of the member's lead (submits jobs).")
    tasks: list[Task] = Field(min_length=1)
    layer: str | None = Field(
        default=None,
        description="Where the member's counts are: a key of adata.layers, or 'raw' (adata.raw). Default: X.",
    )
    var_id_column: str | None = Field(
        default=None, description="A var column holding the panel identifiers. Default: var_names."
    )
    symbol_column: str | None = Field(
        default=None, description="A var column of gene symbols shown in the results (default: 'gene_symbols')."
    )
    region: str | None = Field(
        default=None, description="Where the member's data lives (free text such as 'EU', 'US', 'APAC')."
    )
    sample_column: str | None = Field(
        default=None,
        description="Single-cell member: the obs column naming each cell's sample (donor); the statistics sum "
        "counts per sample (pseudobulk) and count samples, not cells.",
    )
    cell_type_column: str | None = Field(default=None, description="With sample_column: the obs column of cell types.")
    cell_type: str | None = Field(default=None, description="With cell_type_column: the cell type to pseudobulk.")
    read: Literal["auto", "memory", "chunks"] = Field(
        default="auto",
        description="How the member's matrix is read: 'memory' (whole), 'chunks' (a block of rows at a time from "
        "the file, for a matrix larger than memory) or 'auto' (chunks when the matrix would need more than half "
        "the memory available).",
    )

    @model_validator(mode="after")
    def _pseudobulk_settings(self) -> Member:
        if (self.cell_type_column is None) != (self.cell_type is None):
            raise ValueError(
                f"member '{self.name}': give cell_type_column and cell_type together (the column of cell types "
                "and the type to pseudobulk), or neither"
            )
        if self.cell_type_column is not None and self.sample_column is None:
            raise ValueError(
                f"member '{self.name}': cell_type_column needs sample_column (the obs column naming each cell's "
                "sample), since a cell type is pseudobulked per sample"
            )
        if self.read == "chunks" and self.sample_column is not None:
            raise ValueError(
                f"member '{self.name}': read: chunks is not supported with sample_column (pseudobulk sums the "
                "cells in memory); use read: memory or auto for a single-cell member"
            )
        return self

    @field_validator("data")
    @classmethod
    def _h5ad(cls, value: Path) -> Path:
        if value.suffix != ".h5ad":
            raise ValueError(f"'{value}' is not an .h5ad file; point 'data' at the member's AnnData file")
        return value


class DataContract(_Strict):
    """What a member's data must satisfy to join a run."""

    values: Literal["counts", "normalized"] = Field(
        default="counts", description="'counts': non-negative raw counts, normalized by the platform."
    )
    min_class_count: int = Field(default=25, ge=1, description="Labels needed in each class of a binary task.")
    min_events: int = Field(default=25, ge=1, description="Events needed for a survival task.")
    min_labeled: int = Field(default=50, ge=2, description="Labelled samples needed for a regression task.")
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    split_seed: int = 0
    folds: int | None = Field(
        default=None,
        ge=2,
        le=20,
        description="Cross-validation folds: every sample is a test sample once ('consortium run --folds K').",
    )
    min_cell_count: int = Field(
        default=5,
        ge=2,
        description="Association statistics: a member with fewer samples per class (or events) "
        "than this sends nothing for that endpoint (small-cell protection).",
    )


class Training(_Strict):
    rounds: int = Field(default=5, ge=1)
    local_epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    trunk_widths: list[int] = Field(default=[256, 64], min_length=1)
    head_width: int = Field(default=32, ge=0, description="Hidden width of each head; 0 for a linear head.")
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    task_weights: dict[str, float] = Field(default_factory=dict)
    patience: int = Field(default=5, ge=1, description="Epochs without validation gain before early stopping.")
    seed: int = 0
    min_members: int | None = Field(
        default=None, ge=1, description="Members whose update a round needs; the others may drop out (default: all)."
    )
    round_deadline: float = Field(
        default=600.0,
        gt=0.0,
        description="Seconds a round waits for the members beyond min_members before going on; on provisioned kits "
        "also how long the server waits, after the last round, for a silent member to report the job's end.",
    )

    @field_validator("trunk_widths")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError(f"trunk widths must be positive integers, got {widths}")
        return widths


SECURE_AGGREGATION_FLOOR = 3
"""Fewest members a masked round may have (jobs.he.masks.FLOOR_MEMBERS): with two, the sum reveals the other."""
_MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438}  # SEAL's limits for 128-bit security


class HomomorphicEncryption(_Strict):
    """CKKS settings of the encrypted aggregation; checked here so a bad setting fails on load."""

    enabled: bool = True
    poly_modulus_degree: Literal[4096, 8192, 16384] = 8192
    coeff_mod_bit_sizes: list[int] = Field(default=[60, 40], min_length=2)
    global_scale_bits: int = Field(default=40, ge=20, le=60)

    @model_validator(mode="after")
    def _valid_ckks(self) -> HomomorphicEncryption:
        sizes = list(self.coeff_mod_bit_sizes)
        if any(not 17 <= b <= 60 for b in sizes):
            raise ValueError(f"coeff_mod_bit_sizes={sizes}: each prime needs 17 to 60 bits (e.g. [60, 40])")
        limit = _MAX_COEFF_BITS[self.poly_modulus_degree]
        if sum(sizes) > limit:
            raise ValueError(
                f"coeff_mod_bit_sizes={sizes} ({sum(sizes)} bits) exceed the {limit} bits that "
                f"poly_modulus_degree={self.poly_modulus_degree} allows at 128-bit security; use fewer or smaller "
                "primes, or a larger poly_modulus_degree"
            )
        data_bits = sum(sizes[:-1])
        if data_bits <= self.global_scale_bits + 1:
            raise ValueError(
                f"coeff_mod_bit_sizes={sizes}: the data primes {sizes[:-1]} ({data_bits} bits) leave no room above "
                f"the scale 2^{self.global_scale_bits}; use a first prime of at least {self.global_scale_bits + 10} "
                "bits, e.g. [60, 40] with global_scale_bits 40"
            )
        return self


class DifferentialPrivacy(_Strict):
    enabled: bool = False
    epsilon: float = Field(default=8.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)


class Privacy(_Strict):
    he: HomomorphicEncryption = HomomorphicEncryption()
    dp: DifferentialPrivacy = DifferentialPrivacy()
    secure_aggregation: bool | None = Field(
        default=None,
        description="Pairwise masks under what each member sends, cancelling only in the sum (docs/governance.md); "
        "default: on where every round has at least 3 members (3 or more members, training.min_members >= 3).",
    )


class Tracking(_Strict):
    """Where the run's MLflow tracking goes: the members' runs, their metrics, the shared model, the registry."""

    uri: str | None = Field(
        default=None,
        description="An MLflow tracking server (http(s)://host:port) or a SQLite database (sqlite:///path or a "
        "plain path to the .db file, relative to this file); default: mlflow.db in the run folder (docs/tracking.md).",
    )
    experiment: str = "biomarker-consortium"

    @field_validator("uri")
    @classmethod
    def _known_store(cls, uri: str | None) -> str | None:
        return None if uri is None else tracking_store(uri)


class ConsortiumConfig(_Strict):
    """A whole consortium, as written in ``consortium.yaml``."""

    name: Annotated[str, Field(pattern=_NAME)]
    operator: Operator
    panel: Panel
    data: DataContract = DataContract()
    members: list[Member] = Field(min_length=1)
    training: Training = Training()
    privacy: Privacy = Privacy()
    tracking: Tracking = Tracking()
    statistics: Statistics = Statistics()
    feasibility: Feasibility | None = None
    source: Path | None = Field(default=None, exclude=True, description="The file this was read from.")

    @model_validator(mode="after")
    def _unique_names(self) -> ConsortiumConfig:
        if self.training.min_members is not None and self.training.min_members > len(self.members):
            raise ValueError(
                f"training.min_members = {self.training.min_members} but the consortium has {len(self.members)} "
                f"members; give at most {len(self.members)} (or leave it out: every member is needed)"
            )
        _no_duplicates([m.name for m in self.members], "members[].name")
        for member in self.members:
            _no_duplicates([t.name for t in member.tasks], f"members[{member.name}].tasks[].name")
        first: dict[str, tuple[str, str]] = {}
        for member in self.members:
            for task in member.tasks:
                if task.name in first and first[task.name][1] != task.type:
                    owner, kind = first[task.name]
                    raise ValueError(
                        f"endpoint '{task.name}' is {kind} at member '{owner}' but {task.type} at member "
                        f"'{member.name}'; a shared endpoint needs one type everywhere: rename one of them "
                        f"(e.g. '{task.name}_{member.name.replace('-', '_')}') or fix its type"
                    )
                first.setdefault(task.name, (member.name, task.type))
        _one_time_unit(self.members)
        _no_endpoint_inputs(self.panel, self.members)
        known = {t.name for m in self.members for t in m.tasks}
        unknown = sorted(set(self.training.task_weights) - known)
        if unknown:
            raise ValueError(f"training.task_weights names unknown tasks {unknown}; known tasks: {sorted(known)}")
        if self.feasibility is not None:
            self.feasibility.check_members(m.name for m in self.members)
        return self

    @model_validator(mode="after")
    def _secure_aggregation_members(self) -> ConsortiumConfig:
        if self.privacy.secure_aggregation and self.min_members() < SECURE_AGGREGATION_FLOOR:
            raise ValueError(
                f"privacy.secure_aggregation is true but a round may close with {self.min_members()} members "
                f"(training.min_members, {len(self.members)} members): masks need at least "
                f"{SECURE_AGGREGATION_FLOOR} in every round, since with two each reads the other's update from the "
                "sum; set training.min_members to 3 or more (with 3+ members), or secure_aggregation: false"
            )
        return self

    def secure_aggregation(self) -> bool:
        """Whether members mask what they send (``privacy.secure_aggregation``; by default where every round
        has at least 3 members)."""
        chosen = self.privacy.secure_aggregation
        return self.min_members() >= SECURE_AGGREGATION_FLOOR if chosen is None else bool(chosen)

    @model_validator(mode="after")
    def _one_org_per_member(self) -> ConsortiumConfig:
        # Site policies (authorization.json) grant rights by org: two members sharing an org would each
        # pass the other's policy, and a member in the operator's org would let the operator's admin in.
        # Orgs differing only in case are a typo far more often than two organisations.
        owners: dict[str, str | None] = {self.operator.org.lower(): None}  # None: the operator
        for member in self.members:
            org = member.org.lower()
            if org not in owners:
                owners[org] = member.name
                continue
            hint = f"give member '{member.name}' its own org, e.g. '{_org_hint(member.name)}'"
            if owners[org] is None:
                raise ValueError(
                    f"member '{member.name}' has the operator's org '{member.org}' (operator.org is "
                    f"'{self.operator.org}'); site policies are keyed on org, so the operator's admin would pass "
                    f"this member's policy: {hint}"
                )
            raise ValueError(
                f"members '{owners[org]}' and '{member.name}' share the org '{member.org}'; site policies are "
                f"keyed on org, so each would pass the other's policy: {hint}"
            )
        return self

    @model_validator(mode="after")
    def _regions(self) -> ConsortiumConfig:
        if self.statistics.by != "region":
            return self
        missing = [m.name for m in self.members if not m.region]
        if missing:
            raise ValueError(
                f"statistics.by is 'region' but members {missing} have no region; give each member a region "
                "(e.g. region: EU)"
            )
        if len(self.regions()) < 2:
            raise ValueError(
                f"statistics.by is 'region' but every member is in {self.regions()}; subgroups need two or more "
                "regions (or leave statistics.by out)"
            )
        return self

    def regions(self) -> list[str]:
        """The members' regions in order of first appearance (the first is the reference)."""
        return list(dict.fromkeys(m.region for m in self.members if m.region))

    def statistics_min_members(self) -> int:
        """Contributors a released row of a shared endpoint needs: ``statistics.min_members``, by default 3
        (or every member of a consortium of fewer)."""
        return self.statistics.min_members or min(3, len(self.members))

    def member(self, name: str) -> Member:
        """The member called ``name``; a :class:`ConfigError` lists the known names otherwise."""
        for member in self.members:
            if member.name == name:
                return member
        known = ", ".join(m.name for m in self.members)
        raise ConfigError(f"{self.source or 'consortium.yaml'}: no member '{name}'; members are: {known}")

    @property
    def tasks(self) -> list[Task]:
        return [t for m in self.members for t in m.tasks]

    def endpoints(self) -> dict[str, dict]:
        """Per endpoint name, in order of appearance: ``{"type": ..., "members": [...]}``, and a survival
        endpoint's ``"time_unit"`` where declared."""
        found: dict[str, dict] = {}
        for member in self.members:
            for task in member.tasks:
                found.setdefault(task.name, {"type": task.type, "members": []})["members"].append(member.name)
                if task.type == "survival" and task.time_unit:
                    found[task.name]["time_unit"] = task.time_unit
        return found

    def min_members(self) -> int:
        """Members a round needs (``training.min_members``, by default every member)."""
        return self.training.min_members or len(self.members)

    def shared_endpoints(self) -> list[str]:
        """Endpoints held by two or more members: their heads are aggregated like the trunk."""
        return [name for name, info in self.endpoints().items() if len(info["members"]) > 1]

    def panel_features(self) -> list[str]:
        """The omics panel's features, in panel order (empty for a clinical-only consortium): what the
        association statistics test. The model's inputs are :meth:`model_features`."""
        if self.panel.features is not None:
            return list(self.panel.features)
        return _read_panel(self.panel.file) if self.panel.file is not None else []

    def clinical_features(self) -> list[str]:
        """The model inputs of ``panel.clinical`` (``age``, ``sex=F``, ``age (missing)``), in order."""
        return input_names(self.panel.clinical)

    def model_features(self) -> list[str]:
        """The model's inputs, in the order of its input layer: the omics panel, then the clinical inputs.
        What rankings, attributions, the scaling record and the registered model name."""
        omics, clinical = self.panel_features(), self.clinical_features()
        if self.panel.file is not None:
            try:
                _no_clash(omics, clinical, source=f"panel.file '{self.panel.file}'")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return omics + clinical


def _org_hint(member: str) -> str:
    return "".join(part.capitalize() + "_" for part in re.split(r"[-_]", member) if part).rstrip("_")


def _no_endpoint_inputs(panel: Panel, members: list[Member]) -> None:
    """A column an endpoint reads at any member is not a model input: the model would see its labels."""
    inputs = {c.column for c in panel.clinical}
    for member in members:
        for task in member.tasks:
            taken = sorted(inputs & set(task_columns(task)))
            if taken:
                raise ValueError(
                    f"panel.clinical names '{taken[0]}', which task '{task.name}' of member '{member.name}' reads as "
                    "its endpoint; a model input cannot be the label it predicts: remove it from panel.clinical"
                )


def _one_time_unit(members: list[Member]) -> None:
    """A survival endpoint held by several members declares one ``time_unit`` (or none anywhere)."""
    units: dict[str, dict[str | None, str]] = {}
    for member in members:
        for task in member.tasks:
            if task.type == "survival":
                units.setdefault(task.name, {}).setdefault(task.time_unit, member.name)
    for name, seen in units.items():
        if len(seen) > 1:
            declared = ", ".join(f"{unit or 'unset'} at '{owner}'" for unit, owner in seen.items())
            raise ValueError(
                f"endpoint '{name}' has time_unit {declared}; a shared survival endpoint needs one unit: convert "
                "the follow-up times to one unit and give every member the same time_unit"
            )


def _no_clash(omics: list[str], clinical: list[str], *, source: str) -> None:
    both = sorted(set(omics) & set(clinical))
    if both:
        raise ValueError(
            f"{source} and panel.clinical both name the model inputs {both[:5]}; rename the clinical column in "
            "the members' obs (and in panel.clinical), or drop the feature from the panel"
        )


def _no_duplicates(names: list[str], field: str) -> None:
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:
        raise ValueError(f"{field} must be unique; repeated: {dupes}")


def _read_panel(path: Path | None) -> list[str]:
    assert path is not None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"panel.file: cannot read '{path}' ({exc.strerror}); write one feature id a line") from exc
    except UnicodeDecodeError:
        raise ConfigError(
            f"panel.file: '{path}' is not UTF-8 text; write one feature id a line, saved as UTF-8"
        ) from None
    features = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not features:
        raise ConfigError(f"panel.file: '{path}' lists no features; write one feature id a line")
    if len(set(features)) != len(features):
        raise ConfigError(f"panel.file: '{path}' repeats feature ids; each feature must appear once")
    return features


def load_config(path: str | Path) -> ConsortiumConfig:
    """Read and validate ``consortium.yaml``.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a field is invalid; the message names the field, the value
        and the fix.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; write one with 'consortium init --out {path}' and fill it in"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path}: is a folder; pass the consortium.yaml file in it (--config {path / 'consortium.yaml'})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror}); check the path and its permissions") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the syntax at the position shown") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'name', 'operator', 'panel' and 'members'")
    try:
        config = ConsortiumConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc)) from None
    return _resolve_paths(config, path)


def config_from_dict(raw: dict, *, source: Path) -> ConsortiumConfig:
    """Validate an in-memory mapping as if it had been read from ``source``."""
    try:
        config = ConsortiumConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(source, exc)) from None
    return _resolve_paths(config, source)


def dump_config(config: ConsortiumConfig, path: Path) -> None:
    """Write ``config`` as YAML, with paths relative to ``path``'s folder where they lie under it."""
    raw = config.model_dump(mode="json", exclude_none=True, exclude={"source"})
    base = path.parent.resolve()
    for member in raw["members"]:
        member["data"] = _relative(Path(member["data"]), base)
    if "file" in raw["panel"]:
        raw["panel"]["file"] = _relative(Path(raw["panel"]["file"]), base)
    if not raw["panel"]["clinical"]:  # the default: left out, as the file was written
        del raw["panel"]["clinical"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path)


def _resolve_paths(config: ConsortiumConfig, source: Path) -> ConsortiumConfig:
    base = source.parent.resolve()
    members = [m.model_copy(update={"data": _under(base, m.data)}) for m in config.members]
    panel = config.panel
    if panel.file is not None:
        panel = panel.model_copy(update={"file": _under(base, panel.file)})
    tracking = config.tracking.model_copy(update={"uri": sqlite_under(base, config.tracking.uri)})
    return config.model_copy(
        update={"members": members, "panel": panel, "tracking": tracking, "source": source.resolve()}
    )


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def _explain(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid field(s)"]
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        field = re.sub(r"\.(binary|regression|survival)(?=\.|$)", "", field)
        value = error.get("input")
        if error["loc"] == ("tracking", "uri") and isinstance(value, str):
            value = without_credentials(value)
        message = error["msg"].removeprefix("Value error, ")
        hint = _hint(error)
        if not error["loc"]:  # a check across fields: its message names them
            lines.append(f"  {message}{hint}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"  {_unknown_key(error['loc'])}")
        elif error["type"] == "missing" or isinstance(value, dict):  # the input is the parent mapping
            lines.append(f"  {field}: {message}{hint}")
        else:
            shown = repr(value)
            shown = shown if len(shown) <= 60 or not isinstance(value, list) else f"a list of {len(value)} items"
            lines.append(f"  {field} = {shown}: {message}{hint}")
    return "\n".join(lines)


def _unknown_key(loc: tuple) -> str:
    """``unknown key 'ruonds' in training (did you mean 'rounds'?)``: the closest known keys of the mapping
    the key sits in, or all of them when none is close."""
    key, parent = str(loc[-1]), loc[:-1]
    known = _known_keys(parent)
    where = re.sub(r"\.(binary|regression|survival)(?=\.|$)", "", ".".join(str(p) for p in parent))
    where = f"in {where}" if where else "at the top level"
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    if close:
        return f"unknown key '{key}' {where} (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f"unknown key '{key}' {where}: remove it, or use one of {', '.join(known)}"


def _known_keys(loc: tuple) -> list[str]:
    """The keys the schema accepts in the mapping at ``loc`` (list indices skipped, task types picked)."""
    models: list[type[BaseModel]] = [ConsortiumConfig]
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [m for m in models if part in get_args(getattr(m.model_fields.get("type"), "annotation", None))]
        if tagged:  # a discriminated union: pydantic puts the task type into the location
            models = tagged
            continue
        models = [
            inner for m in models if part in m.model_fields for inner in _models_in(m.model_fields[part].annotation)
        ]
    return list(dict.fromkeys(name for m in models for name, info in m.model_fields.items() if not info.exclude))


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through lists, unions, Optional and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Annotated, Union) or get_args(annotation):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def _hint(error: dict) -> str:
    kind = error["type"]
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern")
        return f" ({_ORG_FIX if pattern == _ORG else _EMAIL_FIX if pattern == _EMAIL else _SITE_NAME_FIX})"
    if kind == "missing":
        return " (add this field)"
    if kind == "union_tag_invalid":
        return " (task type must be one of: binary, regression, survival)"
    return ""
