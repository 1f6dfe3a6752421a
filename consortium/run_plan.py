"""The plan of one run: what ``consortium run``, ``demo`` and ``stats`` were asked, checked whole before
anything is written or any data is read, and the jobs it implies.

A command turns its options into :class:`RunOptions` (:meth:`RunOptions.check`: the environment, folds,
seeds, rounds, ``--resume`` with ``--force``, the output folder), then, with the config, into a frozen
:class:`RunPlan` (:meth:`RunPlan.build`: HE in the simulator, the operator's ports for POC, and what the
run folder holds: a live run, an audit log that does not verify, an earlier run, or with ``--resume``
other arguments or another config). A refusal is a :class:`PlanError` (exit 2) naming the problem, and
nothing has been written. :meth:`RunPlan.repetitions` lists the jobs (:class:`JobSpec`), one per seed and
fold, with the config file their sites read and where they keep their outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from consortium.backends.admin_kit import AdminKit, install_member_keys, mask_key_problems, member_context
from consortium.backends.ports import check_ports_free
from consortium.job_audit import custodian_keys
from consortium.run_folder import check_run_folder, check_statistics_folder, consortium_inputs
from consortium.run_options import HE_IN_SIMULATOR, KITS_PLAINTEXT, PlanError, RunOptions
from consortium.run_state import STATE_FILE, job_key
from omics.contract import label_counts
from schema.config import ConsortiumConfig
from schema.errors import UserError


@dataclass(frozen=True)
class JobSpec:
    """One federated job of the run: repetition ``seed``, cross-validation ``fold`` (``None``: one split)."""

    seed: int
    fold: int | None
    key: str
    config_file: Path
    outputs: Path

    def label(self, *, folds: int | None, seeds: int, first_round: int) -> str:
        label = f" (fold {self.fold + 1} of {folds})" if self.fold is not None else ""
        label += f" (seed {self.seed + 1} of {seeds})" if seeds > 1 else ""
        return label + (f", continuing at round {first_round}" if first_round else "")


@dataclass(frozen=True)
class RepetitionSpec:
    """One repetition of the comparison: its training and split seeds, where it writes, its jobs."""

    index: int
    training_seed: int
    split_seed: int
    folder: Path
    config_file: Path
    jobs: tuple[JobSpec, ...]


@dataclass(frozen=True)
class RunPlan:
    """A run, checked whole. ``rounds`` is the count every job runs; ``he`` is decided. ``kit``: the admin
    startup kit a ``kits`` run submits with, and ``member_keys`` the secret context of its lead's member
    kit beside it, which opens the aggregate (:mod:`consortium.backends.kits`)."""

    config: ConsortiumConfig
    command: Literal["run", "stats", "feasibility"]
    env: str
    out: Path
    rounds: int
    baselines: bool
    he: bool
    folds: int | None
    seeds: int
    resume: bool
    force: bool
    timeout: float
    kit: AdminKit | None = None
    member_keys: Path | None = None

    @classmethod
    def build(
        cls, config: ConsortiumConfig, options: RunOptions, *, command: Literal["run", "stats", "feasibility"] = "run"
    ):
        """The plan for ``options`` with ``config``, or a :class:`PlanError` (nothing written, no data read).

        ``stats`` and ``feasibility`` run one job of summed sections (no training)."""
        if command != "run" and options.env == "kits":
            raise PlanError(
                f"consortium {command} runs its job with --env sim or --env poc (--env kits: consortium run)"
            )
        options.check()
        he = config.privacy.he.enabled if options.he is None else options.he
        if he and options.env == "sim":
            raise PlanError(HE_IN_SIMULATOR)
        if command == "stats" and not config.panel_features():
            raise PlanError(
                f"{config.source or 'consortium.yaml'}: consortium stats tests omics features, and panel declares "
                "none (only panel.clinical); the clinical inputs are ranked by the model of 'consortium run' (give "
                "panel.features or panel.file to test omics features)"
            )
        if command != "run" and (options.resume or options.folds or options.seeds != 1 or options.baselines):
            raise PlanError(
                f"consortium {command} runs one job: --resume, --folds, --seeds and --baselines do not apply"
            )
        plan = cls(
            config=config,
            command=command,
            env=options.env,
            out=Path(options.out).resolve(),
            rounds=int(options.rounds or config.training.rounds),
            baselines=options.baselines,
            he=he,
            folds=options.folds or config.data.folds,
            seeds=options.seeds,
            resume=options.resume,
            force=options.force,
            timeout=options.timeout,
            **_kits(config, options, he=he),
        )
        if plan.resume and not (plan.out / STATE_FILE).exists():
            raise PlanError(
                f"{plan.out}: no run to resume here ({STATE_FILE} missing); run the command without --resume"
            )
        plan.check_folder()
        if plan.env == "poc":
            check_ports_free(config)  # another FLARE server on this machine
        return plan

    def he_keys(self, audit) -> Path:
        """The run's HE key folder (``he`` runs): the custodian's key pair, made here for POC, or on kits the
        pair of the lead's member kit (its secret context and the public half), recorded in ``audit``."""
        if self.member_keys is not None:
            install_member_keys(self.member_keys, self.out / "he_keys")  # custodian_keys then records it reused
        return custodian_keys(self.config, self.out, audit)

    def check_folder(self) -> None:
        """What the run folder refuses (read only; checked again once the run holds the folder's lock)."""
        if self.command != "run":
            check_statistics_folder(self.out, inputs=self.inputs(), force=self.force, command=self.command)
        else:
            check_run_folder(self.out, self.arguments(), config=self.config, resume=self.resume, force=self.force)

    def arguments(self) -> dict[str, Any]:
        """What ``--resume`` must be given again, as the run state records it."""
        return dict(
            config=str(self.config.source),
            env=self.env,
            rounds=self.rounds,
            he=self.he,
            folds=self.folds,
            seeds=self.seeds,
            baselines=self.baselines,
        )

    def inputs(self) -> list[Path]:
        """The consortium's own files, which ``--force`` must never delete."""
        return consortium_inputs(self.config)

    @property
    def data_here(self) -> bool:
        """Whether every member's data is on this machine (sim, POC), to be checked here before FLARE starts;
        on kits it stays at the members' sites."""
        return self.env != "kits"

    @property
    def run_config_file(self) -> Path:
        """The config the sites read: consortium.yaml as given, or a copy with the run's fold count."""
        if not self.folds or self.folds == self.config.data.folds:
            return Path(self.config.source)
        return self.out / "consortium.run.yaml"

    def repetitions(self) -> tuple[RepetitionSpec, ...]:
        """Every repetition (seed) and its jobs (one per fold), in the order they run."""
        folds = list(range(self.folds)) if self.folds else [None]
        planned = []
        for index in range(self.seeds):
            folder = self.out if index == 0 else self.out / f"seed{index}"
            config_file = self.run_config_file if index == 0 else self.out / f"consortium.seed{index}.yaml"
            sites = folder / "sites"
            jobs = tuple(
                JobSpec(
                    seed=index,
                    fold=fold,
                    key=job_key(index, fold),
                    config_file=config_file,
                    outputs=sites if fold is None else sites / f"fold{fold}",
                )
                for fold in folds
            )
            training_seed, split_seed = self.config.training.seed + index, self.config.data.split_seed + index
            planned.append(RepetitionSpec(index, training_seed, split_seed, folder, config_file, jobs))
        return tuple(planned)

    def jobs(self) -> list[JobSpec]:
        return [job for repetition in self.repetitions() for job in repetition.jobs]


def _kits(config: ConsortiumConfig, options: RunOptions, *, he: bool) -> dict[str, Any]:
    """A ``kits`` run's admin kit and the member secret context beside it; what the config makes
    impossible there is refused (HE off: the sites refuse plaintext jobs; ``data.folds``)."""
    if options.env != "kits":
        return {}
    if not he:
        raise PlanError(KITS_PLAINTEXT)
    if config.data.folds:
        raise PlanError(
            f"data.folds = {config.data.folds} in {config.source} with --env kits: the out-of-fold figures come "
            "from the test predictions the member sites keep, not this machine; set data.folds to null for kits"
        )
    try:
        kit = AdminKit.at(options.startup_kit, username=options.username)
    except UserError as exc:
        raise PlanError(str(exc)) from None
    secret = member_context(kit, config)
    if secret is None:
        raise PlanError(
            f"--startup-kit {kit.folder}: '{kit.username}' is not the lead of a member whose kit lies beside it "
            f"({kit.folder.parent}/<member>/startup/client_context.tenseal), so this machine cannot open the "
            "encrypted aggregate. Give a lead's kit from a folder that also holds its member's kit, or submit the "
            "job with 'nvflare job submit' and release it at a member with 'consortium release --job ID --kit "
            "LEAD_KIT --keys MEMBER_KIT'"
        )
    masks = mask_key_problems(kit, config)
    if masks:
        raise PlanError(
            f"--startup-kit {kit.folder}: {config.source} uses secure aggregation (privacy.secure_aggregation) and "
            f"the member kits beside it cannot mask:\n  " + "\n  ".join(masks) + "\nEach member runs 'consortium "
            "keys masks --config consortium.yaml --kit KITS/<member> --public DIR' on its own kit (again once DIR "
            "holds every member's public file), then 'consortium keys verify'"
        )
    return {"kit": kit, "member_keys": secret}


def check_fold_labels(plan: RunPlan) -> None:
    """The first data check: ``--folds K`` must leave every fold a sample of each class (binary) and an
    event (survival) at every member."""
    k = plan.folds
    if not k:
        return
    for member in plan.config.members:
        for task, smallest in label_counts(member.data, member.tasks).items():
            if smallest < k:
                raise PlanError(
                    f"--folds {k}: member '{member.name}' endpoint '{task}' has only {smallest} samples in its "
                    f"smallest class (or events); every fold needs one. Use --folds {max(2, smallest)} or fewer"
                )
