"""What ``consortium run``, ``demo`` and ``stats`` were asked, checked before the config is read
(:meth:`RunOptions.check`); light to import, so the CLI builds them before it loads anything heavy.
The plan they become: :mod:`consortium.run_plan`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from consortium.backends.base import ADMIN_CONFIG, ENVIRONMENTS
from schema.errors import UserError

MAX_FOLDS = 20
MAX_SEEDS = 20
DEFAULT_TIMEOUT = 3600.0
"""Seconds one job may run before its backend ends it."""


HE_IN_SIMULATOR = (
    "HE is on (privacy.he.enabled is true, or --he) but the FLARE simulator cannot run encrypted aggregation "
    "(it needs startup kits holding the members' HE contexts); use --env poc, or --no-he for a plaintext quick look"
)


KITS_PLAINTEXT = (
    "--env kits with HE off: the member sites of provisioned kits deploy only jobs of their encrypted privacy "
    "scope (no plaintext model leaves a site); leave out --no-he and set privacy.he.enabled: true"
)


class PlanError(UserError):
    """The run cannot be made as asked; nothing was written."""

    exit_code = 2


@dataclass(frozen=True)
class RunOptions:
    """What the command line asked (``None``: the config's value)."""

    out: Path
    env: str = "sim"
    rounds: int | None = None
    baselines: bool = False
    he: bool | None = None
    folds: int | None = None
    seeds: int = 1
    resume: bool = False
    force: bool = False
    timeout: float = DEFAULT_TIMEOUT
    startup_kit: Path | None = None
    username: str | None = None

    def check(self) -> None:
        """What can be refused without the config: each refusal names the option and the fix."""
        if self.env not in ENVIRONMENTS:
            known = "; ".join(f"'{name}' ({what})" for name, what in ENVIRONMENTS.items())
            raise PlanError(f"--env '{self.env}' is not an environment this command runs; use {known}")
        if self.folds is not None and not 2 <= self.folds <= MAX_FOLDS:
            raise PlanError(
                f"--folds {self.folds}: cross-validation needs 2 to {MAX_FOLDS} folds (every sample is tested "
                "once, in one fold); leave --folds out for one train/test split"
            )
        if not 1 <= self.seeds <= MAX_SEEDS:
            raise PlanError(f"--seeds {self.seeds}: give 1 to {MAX_SEEDS} repetitions")
        if self.rounds is not None and self.rounds < 1:
            raise PlanError(f"--rounds {self.rounds}: a job needs at least one round")
        if self.timeout <= 0:
            raise PlanError(f"timeout {self.timeout}: a job needs a positive deadline in seconds")
        if self.he and self.env == "sim":  # asked for on the command line; the config's default: RunPlan.build
            raise PlanError(HE_IN_SIMULATOR)
        if self.resume and self.force:
            raise PlanError("--resume continues the run in --out and --force empties it first: give one of them")
        self._check_kits()
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise PlanError(f"--out {out} is a file; give a folder (it holds the run's report, logs and MLflow store)")

    def _check_kits(self) -> None:
        """``--env kits`` needs an admin startup kit; what it cannot do from an admin's machine is refused."""
        if self.env != "kits":
            if self.startup_kit is not None or self.username is not None:
                raise PlanError(
                    f"--startup-kit and --username submit to a running provisioned consortium: give --env kits "
                    f"with them, or leave them out for --env {self.env}"
                )
            return
        if self.startup_kit is None:
            raise PlanError(
                "--env kits submits the job to a running provisioned consortium through a lead's admin startup "
                "kit: give --startup-kit KITS/<lead> (the folder 'consortium provision' wrote, holding "
                f"startup/{ADMIN_CONFIG})"
            )
        kit = Path(self.startup_kit)
        if not (kit / "startup" / ADMIN_CONFIG).is_file():
            raise PlanError(
                f"--startup-kit {kit}: not an admin startup kit (no startup/{ADMIN_CONFIG}); give the folder "
                "'consortium provision' wrote for a member's lead, e.g. KITS/lead@pharma-a.org"
            )
        if self.he is False:
            raise PlanError(KITS_PLAINTEXT)
        refused = {
            "--baselines": self.baselines
            and "it trains each member alone and all pooled on every member's data on one machine, and compares "
            "them on the test predictions the member sites keep, not this machine",
            "--folds": self.folds
            and "its out-of-fold figures come from the test predictions the member sites keep, not this machine",
            "--resume": self.resume
            and "it continues from the rounds a job's server stored, which stay in the server's job store",
            "--seeds": self.seeds > 1
            and "each repetition's seeds reach the sites in a config file written here, and the sites read their own",
        }
        for flag, why in refused.items():
            if why:
                raise PlanError(
                    f"{flag} with --env kits: {why}; run it with --env poc on a copy of the data, or leave {flag} out"
                )
