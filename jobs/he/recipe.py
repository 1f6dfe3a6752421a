"""The biomarker job with encrypted aggregation: same client script and server trunk, HE components.

What differs from NVFlare's ``FedAvgRecipeWithHE`` (and why):

- members weight their trunk by ``NUM_STEPS_CURRENT_ROUND`` before encrypting and send the weight
  in plaintext; the server only adds ciphertexts and weights (no multiplication, no division on the
  server), so the CKKS chain ``[60, 40]`` of ``privacy.he`` suffices where stock needs ``[60, 40, 40]``;
- the whole trunk is packed into ``ceil(n / 4096)`` ciphertexts, not one per layer, and no copy of
  the context travels with them (stock: a public context of ~660 KB attached to every layer);
- the server's shareable generator and persistor pass the encrypted aggregate on as it is: the
  aggregate *is* the next global model (members divide by the weight sum after decrypting);
- contexts are loaded from ``startup/`` through the FLARE workspace and unsigned files are accepted,
  because the member custodian installs them after the operator provisioned the kits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.app_opt.pt.job_config.model import PTModel
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import ExecEnv, Recipe

from jobs.he.filters import DecryptAggregate, EncryptWeightedUpdate
from jobs.he.server import CiphertextSumAggregator, EncryptedAggregatePersistor, EncryptedAggregateShareableGenerator

HE_SIM_ENV_ERROR = (
    "the HE job cannot run in FLARE's simulator (SimEnv): it needs startup kits holding the HE contexts "
    "(members: startup/client_context.tenseal with the secret key; server: startup/server_context.tenseal "
    "without it). Run it in POC (jobs.he.poc.HEPocEnv, or 'consortium run --env poc') or on provisioned "
    "kits (ProdEnv) after 'consortium keys install'; or set privacy.he.enabled: false to use the simulator"
)
TRAIN_TASK = "train"


class HEFedAvgRecipe(Recipe):
    """FedAvg over the shared trunk with CKKS-encrypted aggregation (the server never decrypts).

    Parameters are those of ``FedAvgRecipe`` that the consortium job uses, so the plaintext job's
    arguments build this one unchanged.

    Parameters
    ----------
    name, min_clients, num_rounds
        As in ``FedAvgRecipe``.
    model
        The server's trunk: an ``nn.Module`` or ``{"class_path": "...", "args": {...}}``. Round 0
        sends its initial weights in plaintext (they carry no member data).
    train_script, train_args
        The Client API script every member runs, and its arguments.
    key_metric, key_metric_mode
        Passed to FLARE's model selector (it cannot select among encrypted models; it only logs).
    """

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        min_clients: int,
        num_rounds: int,
        train_script: str,
        train_args: str = "",
        key_metric: str = "accuracy",
        key_metric_mode: str = "max",
    ) -> None:
        if num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds}; a federated run needs at least one round")
        self.name = name
        self.min_clients = min_clients
        self.num_rounds = num_rounds
        job = BaseFedJob(name=name, min_clients=min_clients, key_metric=key_metric, key_metric_mode=key_metric_mode)

        job_model = _job_model(model)
        persistor = EncryptedAggregatePersistor(model=job_model)
        job.comp_ids.update(job.to_server(PTModel(model=job_model, persistor=persistor)))
        aggregator_id = job.to_server(CiphertextSumAggregator(), id="aggregator")
        generator_id = job.to_server(EncryptedAggregateShareableGenerator(), id="shareable_generator")
        job.to_server(
            ScatterAndGather(
                min_clients=min_clients,
                num_rounds=num_rounds,
                wait_time_after_min_received=0,
                aggregator_id=aggregator_id,
                persistor_id=job.comp_ids["persistor_id"],
                shareable_generator_id=generator_id,
                train_task_name=TRAIN_TASK,
            )
        )

        job.to_clients(
            ScriptRunner(
                script=train_script,
                script_args=train_args,
                framework=FrameworkType.PYTORCH,
                server_expected_format=ExchangeFormat.NUMPY,
                params_transfer_type=TransferType.FULL,
            )
        )
        job.to_clients(DecryptAggregate(), tasks=[TRAIN_TASK], filter_type=FilterType.TASK_DATA)
        job.to_clients(EncryptWeightedUpdate(), tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT)
        super().__init__(job)

    def process_env(self, env: ExecEnv) -> None:
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):
            raise ValueError(HE_SIM_ENV_ERROR)
        super().process_env(env)


def _job_model(model: Any) -> Any:
    if isinstance(model, dict):
        from nvflare.recipe.utils import recipe_model_to_job_model

        return recipe_model_to_job_model(model)
    return model


def build_he_recipe(
    config: Any,
    *,
    config_path: Path | None = None,
    outputs: Path | None = None,
    rounds: int | None = None,
    tracking_uri: str | None = None,
    **recipe_args: Any,
) -> Recipe:
    """The consortium's HE job for ``config``.

    Two ways in, one job:

    - ``build_he_recipe(config, config_path=..., outputs=..., rounds=..., tracking_uri=...)`` builds
      the whole job through :func:`jobs.biomarker_mtl.job.build_recipe` with ``he=True`` (client
      script and arguments, server trunk, MLflow, the sites' ``consortium-he`` privacy scope);
    - ``build_recipe(..., he=True)`` calls back here with the plaintext job's recipe arguments
      (``name``, ``model``, ``min_clients``, ``num_rounds``, ``train_script``, ``train_args``) and
      gets the bare :class:`HEFedAvgRecipe`.
    """
    if recipe_args:
        given = [k for k, v in {"config_path": config_path, "outputs": outputs, "rounds": rounds}.items() if v]
        if given or tracking_uri:
            raise TypeError(f"pass either recipe arguments or {given + ['tracking_uri'] * bool(tracking_uri)}")
        from jobs.biomarker_mtl.site import KEY_METRIC

        recipe_args.setdefault("key_metric", KEY_METRIC)
        return HEFedAvgRecipe(**recipe_args)
    from jobs.biomarker_mtl.job import build_recipe

    return build_recipe(
        config, config_path=config_path, outputs=outputs, rounds=rounds, he=True, tracking_uri=tracking_uri
    )
