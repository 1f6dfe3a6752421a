"""The consortium's FLARE job as a recipe: the sites' sections summed at the server, plain or under HE.

The server holds a :class:`models.network.SharedModel` (the trunk and the heads of shared endpoints)
for round 0, then only adds what the members send (:mod:`jobs.aggregation`). Every member runs
``jobs/client.py``. With ``he=True`` the members' filters encrypt and decrypt (:mod:`jobs.he.filters`),
the aggregator adds ciphertexts, and the job declares the member sites' privacy scope. The same
recipe runs in ``SimEnv`` (plaintext only), POC and ``ProdEnv``, or is exported for
``nvflare job submit``; an export names no path of this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.app_opt.pt.job_config.model import PTModel
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import ExecEnv, Recipe
from nvflare.recipe.utils import recipe_model_to_job_model, set_recipe_meta

from jobs.aggregation import SectionAggregatePersistor, SectionShareableGenerator, SectionSumAggregator
from jobs.executor import InstalledClientScript
from jobs.flare_tuning import SimulatorTaskPacing
from jobs.he.filters import DecryptAggregate, EncryptSections
from jobs.job_end import MarkJobEnded
from jobs.member_masks import COMPONENT_ID as MASKS_ID
from jobs.member_masks import MaskWords, MemberMasks, SecureAggregationTasks
from jobs.published import PublishedResultsRecorder
from jobs.tracking import MemberRuns, member_params
from jobs.workflow import SumScatterAndGather
from schema import settings
from schema.config import ConsortiumConfig
from schema.names import HE_SCOPE, KEY_METRIC, SECAGG_RESEND_TASK, TRAIN_TASK

CLIENT_SCRIPT = Path(__file__).resolve().with_name("client.py")
HE_SIM_ENV_ERROR = (
    "the HE job cannot run in FLARE's simulator (SimEnv): it needs startup kits holding the HE contexts "
    "(members: startup/client_context.tenseal with the secret key; server: startup/server_context.tenseal "
    "without it). Run it in POC ('consortium run --env poc') or on provisioned kits after "
    "'consortium keys install'; or turn HE off (--no-he) to use the simulator"
)
# FLARE's polling cadence, set through the job's own config (the same in SimEnv, POC and on kits).
# The server tells a client to come back for its next task after ``task_request_interval`` seconds
# (FLARE's default: 2 s, paid once per round, after every result); the workflow looks at its tasks
# every ``task_check_period`` (default 0.5 s; :mod:`jobs.workflow` makes it reach the server's
# communicator, which NVFlare 2.9 leaves at 0.2 s); a client with no task assignment at all retries after
# ``default_task_fetch_interval`` (default 0.5 s). A few idle requests per second per member cost far
# less than the 2-2.5 s per round the defaults add. The in-process executor's own result polling
# (0.5 s) has no public setting in NVFlare 2.9; the client script shortens it in its own process
# (:mod:`jobs.flare_tuning`, version-checked), and the site loop keeps its own side short (``jobs.site.serve``).
TASK_REQUEST_INTERVAL = 0.1
TASK_CHECK_PERIOD = 0.05
CLIENT_TASK_FETCH_INTERVAL = 0.1
SIMULATOR_PACING_ID = "simulator_task_pacing"  # the simulated job's member component (jobs.flare_tuning)


def job_name(config: ConsortiumConfig) -> str:
    return f"{config.name}-biomarker-mtl"


def server_model(config: ConsortiumConfig) -> dict[str, Any]:
    """The server's round-0 model as class path + arguments: trunk and shared heads, rebuilt at the server."""
    training = config.training
    return {
        "class_path": "models.network.SharedModel",
        "args": {
            "n_features": len(config.model_features()),
            "shared_tasks": config.shared_endpoints(),
            "trunk_widths": list(training.trunk_widths),
            "head_width": training.head_width,
            "dropout": training.dropout,
            "seed": training.seed,
        },
    }


def client_args(
    *,
    config_path: Path | None,
    outputs: Path | None,
    fold: int | None = None,
    statistics_only: bool = False,
    first_round: int = 0,
    feasibility: Path | None = None,
    member_counts: bool = False,
) -> str:
    """``train_args`` of the client script: paths, the fold, the job's kind and a continuing job's first
    round only; every setting comes from consortium.yaml."""
    args: list[str] = [] if fold is None else ["--fold", str(int(fold))]
    if statistics_only:
        args.append("--stats-only")
    if first_round:
        args += ["--first-round", str(int(first_round))]
    if member_counts:
        args.append("--member-counts")
    for flag, path in (("--config", config_path), ("--outputs", outputs), ("--feasibility", feasibility)):
        if path is None:
            continue
        text = str(Path(path).resolve())
        if any(c.isspace() for c in text):
            # FLARE splits train_args on whitespace without honouring quotes
            raise ValueError(
                f"{flag} path '{text}' holds whitespace, which FLARE's train_args cannot carry; "
                "move the folder to a path without spaces"
            )
        args += [flag, text]
    return " ".join(args)


class ConsortiumRecipe(Recipe):
    """ScatterAndGather over summed sections (:mod:`jobs.workflow`); ``he`` adds the members' CKKS filters
    and the HE scope."""

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        min_clients: int,
        num_rounds: int,
        train_script: str,
        train_args: str = "",
        he: bool = False,
        all_clients: int | None = None,
        round_deadline: float = 600.0,
        first_round: int = 0,
        resume_from: str = "",
        secure_aggregation: dict | None = None,
    ) -> None:
        """``min_clients`` members must answer each round; with fewer than ``all_clients``, a round waits
        up to ``round_deadline`` seconds for the others, then goes on without them. A job continuing an
        interrupted one runs rounds ``first_round`` to ``num_rounds - 1`` from the aggregate stored at
        ``resume_from`` (a path at the server). ``secure_aggregation`` (``{"holders": {endpoint: [members]},
        "min_members": n}``) has the members mask what they send (:mod:`jobs.member_masks`)."""
        if num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds}; a federated run needs at least one round")
        if not 0 <= first_round < num_rounds or bool(first_round) != bool(resume_from):
            raise ValueError(
                f"first_round={first_round} with resume_from={resume_from!r}: a continuing job starts at a "
                f"round below num_rounds={num_rounds}, from a stored aggregate"
            )
        self.name, self.min_clients, self.num_rounds, self.he = name, min_clients, num_rounds, he
        self.secure_aggregation = secure_aggregation is not None
        masking = secure_aggregation or {}
        job = BaseFedJob(name=name, min_clients=min_clients, key_metric=KEY_METRIC, key_metric_mode="max")
        job_model = recipe_model_to_job_model(model) if isinstance(model, dict) else model
        persistor = SectionAggregatePersistor(model=job_model, resume_from=resume_from)
        job.comp_ids.update(job.to_server(PTModel(model=job_model, persistor=persistor)))
        aggregator_id = job.to_server(SectionSumAggregator(he=he), id="aggregator")
        generator_id = job.to_server(SectionShareableGenerator(), id="shareable_generator")
        job.to_server(
            SumScatterAndGather(
                min_clients=min_clients,
                # FLARE numbers a continuing job's rounds from start_round and counts only its own
                start_round=first_round,
                num_rounds=num_rounds - first_round,
                # every member answering ends a round at once; a silent one is waited for until the deadline
                wait_time_after_min_received=int(round_deadline) if min_clients < (all_clients or min_clients) else 0,
                # a round that has not heard from min_clients by the deadline ends the job, naming who was silent
                train_timeout=int(round_deadline),
                aggregator_id=aggregator_id,
                persistor_id=job.comp_ids["persistor_id"],
                shareable_generator_id=generator_id,
                train_task_name=TRAIN_TASK,
                task_check_period=TASK_CHECK_PERIOD,
                # FLARE's default collects garbage and trims the heap after every round, between
                # aggregation and the next round's start (0.1-0.4 s here); the summed sections are freed
                # by reference counting anyway
                memory_gc_rounds=0,
                secure_aggregation=self.secure_aggregation,
                holders=masking.get("holders"),
                min_members=int(masking.get("min_members") or 0),
            )
        )
        job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
        job.to_server(PublishedResultsRecorder(), filter_type=FilterType.TASK_RESULT, tasks=[TRAIN_TASK])
        job.to_clients(
            ScriptRunner(
                script=train_script,
                script_args=train_args,
                framework=FrameworkType.PYTORCH,
                server_expected_format=ExchangeFormat.NUMPY,
                params_transfer_type=TransferType.FULL,
            )
        )
        job.to_clients({"default_task_fetch_interval": CLIENT_TASK_FETCH_INTERVAL})
        self.member_masks: MemberMasks | None = None
        if self.secure_aggregation:
            self.member_masks = MemberMasks(
                he=he, holders=masking.get("holders"), min_members=masking.get("min_members")
            )
            job.to_clients(self.member_masks, id=MASKS_ID)
            job.to_clients(SecureAggregationTasks(), tasks=[SECAGG_RESEND_TASK])
            if not he:
                job.to_clients(MaskWords(), tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT)
        if he:
            job.to_clients(DecryptAggregate(), tasks=[TRAIN_TASK], filter_type=FilterType.TASK_DATA)
            encrypt = EncryptSections(secure_aggregation=self.secure_aggregation)
            job.to_clients(encrypt, tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT)
        super().__init__(job)
        self.fed_job = job  # what later additions go to (the recipe's own attribute is private)
        self._simulator_paced = False
        if he:
            set_recipe_meta(self, JobMetaKey.SCOPE, HE_SCOPE)

    def use_key_folder(self, folder: Path) -> None:
        """Simulated members: their mask keys are in ``folder/<member>/`` (not in a kit's ``startup/``)."""
        if self.member_masks is not None:
            self.member_masks.key_folder = str(Path(folder).resolve())

    def process_env(self, env: ExecEnv) -> None:
        from nvflare.recipe.sim_env import SimEnv

        if self.he and isinstance(env, SimEnv):
            raise ValueError(HE_SIM_ENV_ERROR)
        if isinstance(env, SimEnv) and not self._simulator_paced:
            # FLARE's simulated members retry a task fetch after 0.5 s sleeps (jobs.flare_tuning)
            self.fed_job.to_clients(SimulatorTaskPacing(), id=SIMULATOR_PACING_ID)
            self._simulator_paced = True
        super().process_env(env)


def build_recipe(
    config: ConsortiumConfig,
    *,
    he: bool,
    config_path: Path | None = None,
    outputs: Path | None = None,
    rounds: int | None = None,
    fold: int | None = None,
    tracking_uri: str | None = None,
    statistics_only: bool = False,
    first_round: int = 0,
    resume_from: Path | None = None,
    feasibility: Path | None = None,
) -> ConsortiumRecipe:
    """The job for ``config``.

    Parameters
    ----------
    he
        Aggregate under homomorphic encryption (the members' CKKS filters, the HE privacy scope).
    config_path
        The ``consortium.yaml`` the sites read; ``None`` leaves it to each site's ``CONSORTIUM_CONFIG``.
    outputs
        Root of the sites' private outputs folders (``<outputs>/<member>/``); ``None`` leaves it to each site.
    rounds
        Overrides ``training.rounds``.
    fold
        With ``data.folds``: the cross-validation fold that is this job's test split.
    tracking_uri
        MLflow tracking URI of the server's receiver; default ``tracking.uri``, else an SQLite file in
        the server's job result folder.
    statistics_only
        The ``consortium stats`` job: each member sends only its association statistics' pieces (no
        training), in one round, or one round per Newton step of a Cox model of covariates and one more
        (``schema.settings.statistics_rounds``); ``rounds`` is ignored.
    first_round, resume_from
        Continue an interrupted job: rounds ``first_round`` to the last, from the aggregate stored after
        round ``first_round - 1`` (the file ``FL_global_model.sections`` the interrupted job's server
        kept, readable by the server); each member continues from the trainer it saved after that round.
    feasibility
        The ``consortium feasibility`` job: one round in which each member sends only its counts of this
        ``protocol.yaml`` (:mod:`jobs.site_feasibility`); ``rounds`` is ignored.
    """
    planned = int(rounds if rounds is not None else config.training.rounds)
    num_rounds = 1 if feasibility else settings.statistics_rounds(config) if statistics_only else planned
    kind = "-feasibility" if feasibility else "-stats" if statistics_only else ""
    recipe = ConsortiumRecipe(
        name=f"{job_name(config)}{kind}" + ("" if fold is None else f"-fold{fold}"),
        model=server_model(config),
        min_clients=config.min_members(),
        all_clients=len(config.members),
        round_deadline=config.training.round_deadline,
        num_rounds=num_rounds,
        train_script=str(CLIENT_SCRIPT),
        train_args=client_args(
            config_path=config_path,
            outputs=outputs,
            fold=fold,
            statistics_only=statistics_only,
            first_round=first_round,
            feasibility=feasibility,
            # a plaintext job without masks: the operator reads each update anyway
            member_counts=bool(feasibility) and not he and not config.secure_aggregation(),
        ),
        he=he,
        first_round=first_round,
        resume_from=str(Path(resume_from).resolve()) if resume_from else "",
        secure_aggregation=masking_plan(config),
    )
    _add_tracking(recipe, config, he=he, tracking_uri=tracking_uri or config.tracking.uri, rounds=num_rounds)
    # last of the server's components: it handles the job's end after every other one has
    recipe.fed_job.to_server(MarkJobEnded(), id="job_end")
    return recipe


def masking_plan(config: ConsortiumConfig) -> dict | None:
    """What the job's masks need from ``consortium.yaml``, or None without secure aggregation."""
    if not config.secure_aggregation():
        return None
    holders = {name: list(info["members"]) for name, info in config.endpoints().items()}
    return {"holders": holders, "min_members": config.min_members()}


def _add_tracking(recipe: Recipe, config: ConsortiumConfig, *, he: bool, tracking_uri: str | None, rounds: int) -> None:
    """Server-side MLflow receiver: one MLflow run per member, fed by the sites' ``MLflowWriter``, named after
    the member and holding its parameters (:class:`jobs.tracking.MemberRuns`)."""
    tags = {"consortium": config.name, "he": "on" if he else "off", "dp": "on" if config.privacy.dp.enabled else "off"}
    kw_args = {
        "experiment_name": config.tracking.experiment,
        "run_name": "he-fedavg" if he else "fedavg",  # NVFlare's part of the name; MemberRuns renames the runs
        "experiment_tags": {"consortium": config.name},
        "run_tags": tags,
    }
    receiver = MemberRuns(
        params=member_params(config, he=he, rounds=rounds), tracking_uri=tracking_uri or None, kw_args=kw_args
    )
    recipe.fed_job.to_server(receiver, id="receiver")


def export_job(config: ConsortiumConfig, job_dir: Path, *, he: bool, rounds: int | None = None) -> Path:
    """Export the job for ``nvflare job submit -j <job_dir>/<job name>``; returns that folder.

    The export names no path of this machine and ships no code (leads have no ``byoc`` right on
    provisioned kits): each site reads its ``consortium.yaml`` from ``CONSORTIUM_CONFIG`` and runs the
    client script of the ``jobs`` package it installed (:class:`jobs.executor.InstalledClientScript`;
    the project must be installed at every site, as NVFlare 2.9 must).
    """
    recipe = build_recipe(config, he=he, rounds=rounds)
    recipe.export(str(job_dir))
    folder = Path(job_dir) / recipe.name
    run_installed_code(folder)
    return folder


def run_installed_code(folder: Path) -> None:
    """Point the members' executor at the installed client script and drop the ``custom/`` copies."""
    for config_file in folder.glob("*/config/config_fed_client.json"):
        client_config = json.loads(config_file.read_text())
        for executor in client_config.get("executors", []):
            spec = executor.get("executor", {})
            if spec.get("path", "").endswith(".ClientAPIExecutor"):
                spec["path"] = f"{InstalledClientScript.__module__}.{InstalledClientScript.__name__}"
                spec.get("args", {}).pop("task_script_path", None)
        config_file.write_text(json.dumps(client_config, indent=2))
    for custom in folder.glob("*/custom"):
        shutil.rmtree(custom)
