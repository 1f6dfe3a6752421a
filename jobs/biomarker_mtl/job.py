"""The biomarker multitask FLARE job as a recipe: FedAvg over the shared trunk, heads stay at the sites.

The server holds a :class:`models.SharedTrunk` (trunk keys only) and averages the trunks the members
send; every member runs ``client.py``. The same recipe runs in ``SimEnv``, ``PocEnv`` and ``ProdEnv``
(see :mod:`jobs.runner`), or is exported for ``nvflare job submit``::

    python jobs/biomarker_mtl/job.py --config consortium.yaml --export --export-dir DIR
    nvflare job submit -j DIR

An exported job names no local paths: each site gives its own ``consortium.yaml`` through
``CONSORTIUM_CONFIG`` (and optionally ``CONSORTIUM_SITE_OUTPUTS``) in its environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.pt.recipes import FedAvgRecipe
from nvflare.recipe import add_experiment_tracking
from nvflare.recipe.spec import Recipe, _peek_recipe_args
from nvflare.recipe.utils import set_recipe_meta

from consortium.config import ConsortiumConfig, load_config
from jobs.biomarker_mtl.site import KEY_METRIC

CLIENT_SCRIPT = Path(__file__).resolve().with_name("client.py")
HE_SCOPE = "consortium-he"  # the sites' privacy.json defines it (provisioning)
HE_RECIPE_MODULE = "jobs.he.recipe"


def job_name(config: ConsortiumConfig) -> str:
    return f"{config.name}-biomarker-mtl"


def server_model(config: ConsortiumConfig) -> dict[str, Any]:
    """The server's model as a class path + arguments: the trunk alone, rebuilt at the server."""
    training = config.training
    return {
        "class_path": "models.network.SharedTrunk",
        "args": {
            "n_features": len(config.panel_features()),
            "trunk_widths": list(training.trunk_widths),
            "dropout": training.dropout,
            "seed": training.seed,
        },
    }


def client_args(*, config_path: Path | None, outputs: Path | None) -> str:
    """``train_args`` of the client script: paths only, every setting comes from consortium.yaml."""
    args: list[str] = []
    for flag, path in (("--config", config_path), ("--outputs", outputs)):
        if path is None:
            continue
        text = str(Path(path).resolve())
        if any(c.isspace() for c in text):
            # FLARE splits train_args on whitespace without honouring quotes
            raise ValueError(f"{flag} path '{text}' holds whitespace, which FLARE's train_args cannot carry; "
                             "move the folder to a path without spaces")
        args += [flag, text]
    return " ".join(args)


def build_recipe(
    config: ConsortiumConfig,
    *,
    config_path: Path | None,
    outputs: Path | None,
    rounds: int | None = None,
    he: bool = False,
    tracking_uri: str | None = None,
) -> Recipe:
    """The job for ``config``.

    Parameters
    ----------
    config
        The consortium.
    config_path
        The ``consortium.yaml`` the sites read; ``None`` leaves it to each site's ``CONSORTIUM_CONFIG``.
    outputs
        Root of the sites' outputs folders (``<outputs>/<member>/``); ``None`` leaves it to each site.
    rounds
        Overrides ``training.rounds``.
    he
        Aggregate under homomorphic encryption: the recipe comes from :mod:`jobs.he.recipe`.
    tracking_uri
        MLflow tracking URI of the server's receiver; default ``tracking.uri`` of the config, else an
        SQLite file in the server's job result folder.

    Raises
    ------
    NotImplementedError
        ``he=True`` but the HE recipe module is not installed.
    """
    num_rounds = int(rounds if rounds is not None else config.training.rounds)
    if num_rounds < 1:
        raise ValueError(f"rounds={num_rounds}; a federated run needs at least one round")
    recipe_args = {
        "name": job_name(config),
        "model": server_model(config),
        "min_clients": len(config.members),
        "num_rounds": num_rounds,
        "train_script": str(CLIENT_SCRIPT),
        "train_args": client_args(config_path=config_path, outputs=outputs),
    }
    if he:
        recipe = _he_recipe(config, recipe_args)
        set_recipe_meta(recipe, JobMetaKey.SCOPE, HE_SCOPE)
    else:
        recipe = FedAvgRecipe(**recipe_args, key_metric=KEY_METRIC, key_metric_mode="max")
    _add_tracking(recipe, config, he=he, tracking_uri=tracking_uri or config.tracking.uri)
    return recipe


def _he_recipe(config: ConsortiumConfig, recipe_args: dict[str, Any]) -> Recipe:
    try:
        module = importlib.import_module(HE_RECIPE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (HE_RECIPE_MODULE, "jobs.he"):
            raise
        raise NotImplementedError(
            f"HE aggregation needs {HE_RECIPE_MODULE}.build_he_recipe, which is not installed; "
            "run without HE (privacy.he.enabled: false) or install the HE job"
        ) from None
    return module.build_he_recipe(config, **recipe_args)


def _add_tracking(recipe: Recipe, config: ConsortiumConfig, *, he: bool, tracking_uri: str | None) -> None:
    """Server-side MLflow receiver: one MLflow run per site, fed by the sites' ``MLflowWriter``."""
    tags = {
        "consortium": config.name,
        "he": "on" if he else "off",
        "dp": "on" if config.privacy.dp.enabled else "off",
    }
    tracking: dict[str, Any] = {
        "kw_args": {
            "experiment_name": config.tracking.experiment,
            "run_name": "he-fedavg" if he else "fedavg",
            "experiment_tags": {"consortium": config.name},
            "run_tags": tags,
        }
    }
    if tracking_uri:
        tracking["tracking_uri"] = tracking_uri
    add_experiment_tracking(recipe, "mlflow", tracking)


def export_job(
    config: ConsortiumConfig, job_dir: Path, *, rounds: int | None = None, he: bool = False
) -> Path:
    """Export the job for ``nvflare job submit -j <job_dir>/<job name>``; returns that folder.

    The export names no path of this machine: each site reads its ``consortium.yaml`` from
    ``CONSORTIUM_CONFIG`` and runs the client script from the job's ``custom/`` folder (the project
    itself must be installed at every site, as NVFlare 2.9 must).
    """
    recipe = build_recipe(config, config_path=None, outputs=None, rounds=rounds, he=he)
    recipe.export(str(job_dir))
    folder = Path(job_dir) / recipe.name
    _script_path_relative_to_custom(folder)
    return folder


def _script_path_relative_to_custom(folder: Path) -> None:
    """FLARE keeps this machine's absolute path of the client script; point it at the copy in custom/.

    Where FLARE puts that copy depends on ``sys.path`` (``custom/client.py`` or
    ``custom/jobs/biomarker_mtl/client.py``), so look for it.
    """
    for config_file in folder.glob("*/config/config_fed_client.json"):
        custom = config_file.parent.parent / "custom"
        copies = [p for p in custom.rglob(CLIENT_SCRIPT.name) if p.read_bytes() == CLIENT_SCRIPT.read_bytes()]
        if not copies:
            raise RuntimeError(f"{custom}: the exported job holds no copy of {CLIENT_SCRIPT}")
        client_config = json.loads(config_file.read_text())
        for executor in client_config.get("executors", []):
            args = executor.get("executor", {}).get("args", {})
            if args.get("task_script_path") == str(CLIENT_SCRIPT):
                args["task_script_path"] = copies[0].relative_to(custom).as_posix()
        config_file.write_text(json.dumps(client_config, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """Export the job (``--export --export-dir DIR``) or run it in the simulator."""
    parser = argparse.ArgumentParser(description="Build the biomarker multitask FLARE job.")
    parser.add_argument("--config", type=Path, required=True, help="consortium.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="override training.rounds")
    parser.add_argument("--he", action="store_true", help="aggregate under homomorphic encryption")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="simulator run folder (without --export); default: runs/<job name> next to the config")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    # nvflare.recipe takes --export / --export-dir out of sys.argv when it is imported (hello-pt style)
    exporting, export_dir = _peek_recipe_args()
    if exporting:
        folder = export_job(config, Path(export_dir), rounds=args.rounds, he=args.he)
        print(f"job exported to {folder}; submit it with: nvflare job submit -j {folder}")
        return
    from jobs.runner import run_federated

    out = args.workspace or args.config.resolve().parent / "runs" / job_name(config)
    result = run_federated(config, env="sim", out=out, rounds=args.rounds, he=args.he)
    print(f"job {result.job_id} done in {result.seconds:.1f} s; outputs in {result.out}")


if __name__ == "__main__":
    main()
