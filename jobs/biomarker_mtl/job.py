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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.pt.recipes import FedAvgRecipe
from nvflare.recipe import add_experiment_tracking
from nvflare.recipe.spec import Recipe
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


def main(argv: Sequence[str] | None = None) -> None:
    """Export the job (``--export --export-dir DIR``) or run it in the simulator."""
    parser = argparse.ArgumentParser(description="Build the biomarker multitask FLARE job.")
    parser.add_argument("--config", type=Path, required=True, help="consortium.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="override training.rounds")
    parser.add_argument("--he", action="store_true", help="aggregate under homomorphic encryption")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="simulator run folder (without --export); default: runs/<job name> next to the config")
    args = parser.parse_args(argv)  # --export / --export-dir were taken by nvflare.recipe on import
    config = load_config(args.config)
    from nvflare.recipe.spec import _peek_recipe_args

    exporting, _ = _peek_recipe_args()
    if exporting:
        # an exported job travels to other machines: no local paths in it
        recipe = build_recipe(config, config_path=None, outputs=None, rounds=args.rounds, he=args.he)
        recipe.execute(env=None)  # type: ignore[arg-type]  # exports and exits
        return
    from jobs.runner import run_federated

    out = args.workspace or args.config.resolve().parent / "runs" / job_name(config)
    result = run_federated(config, env="sim", out=out, rounds=args.rounds, he=args.he)
    print(f"job {result.job_id} done in {result.seconds:.1f} s; outputs in {result.out}")


if __name__ == "__main__":
    main()
