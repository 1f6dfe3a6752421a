"""One federated run of the consortium, end to end: the job, the baselines, the report, the tracking.

``consortium run`` and ``consortium demo`` call :func:`run_consortium`. In the simulator and in POC
every member's site runs on this machine, so the orchestrator reads each site's outputs folder to
build the report; in production each member publishes its own rankings and metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from consortium.audit import (
    EVENT_JOB_SUBMITTED,
    EVENT_KEYS_CREATED,
    EVENT_MODEL_RELEASED,
    EVENT_ROUND_COMPLETED,
    AuditLog,
)
from consortium.config import ConsortiumConfig
from consortium.errors import UserError
from consortium.report import ranking_records, round_summary, write_report
from consortium.shared_model import ensure_experiment, log_shared_model, shared_trunk_state
from jobs import member_data
from jobs.runner import FederatedRun, run_federated, tracking_uri_for
from jobs.site_outputs import read_rankings
from models.attribution import consensus_ranking, precision_at_k, rank_features
from models.baselines import train_local, train_pooled
from models.metrics import primary_metric
from provisioning.he_keys import CLIENT_CONTEXT, SERVER_CONTEXT, create_keys, load_context, public_fingerprint
from provisioning.policies import privacy_policy

log = logging.getLogger(__name__)

EVENT_KEYS_REUSED = "keys_reused"
DEFINITIONS = {
    "federated": (
        "the member's model at the end of the run: its private heads on the trunk it trained locally from "
        "the last round's global trunk (FedAvg with per-member heads), scored on its own test split; its "
        "biomarker rankings come from the same model"
    ),
    "local": "the same network trained on the member's data alone (early stopping on its validation split)",
    "pooled": "one network trained on all members' data pooled, every member's heads, one early stopping",
    "shared_model": "the final aggregated trunk, as released to MLflow (decrypted by a member under HE)",
}
BASELINE_MAX_EPOCHS = 60  # with early stopping on the validation split: each baseline gets its best shot


class RunError(UserError):
    """A run could not be made as asked."""

    exit_code = 2


@dataclass
class RunResult:
    report: dict[str, Any]
    report_path: Path
    markdown_path: Path
    federated: FederatedRun


def run_consortium(
    config: ConsortiumConfig,
    *,
    env: Literal["sim", "poc"],
    out: Path,
    rounds: int | None = None,
    baselines: bool = False,
    he: bool | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    status: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the federated job, then (optionally) the baselines, and write ``out/report.json``.

    Parameters
    ----------
    he
        Encrypted aggregation; defaults to ``privacy.he.enabled``. The simulator cannot run it (HE needs
        startup kits holding the members' contexts): asking for both is a :class:`RunError`.
    status
        Called with a short line before each long step (for the CLI).
    """
    he = config.privacy.he.enabled if he is None else he
    if he and env == "sim":
        raise RunError(
            "privacy.he.enabled is true but the FLARE simulator cannot run encrypted aggregation (it needs "
            "startup kits holding the members' HE contexts); use --env poc, or --no-he for a plaintext quick look"
        )
    say = status or (lambda line: log.info(line))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(out / "audit.jsonl")
    total = rounds or config.training.rounds
    he_options = _he_ceremony(config, out, audit) if he else {}
    audit.append(
        EVENT_JOB_SUBMITTED,
        consortium=config.name,
        env=env,
        rounds=total,
        he=he,
        dp=config.privacy.dp.enabled,
        members=[m.name for m in config.members],
    )
    ensure_experiment(config, tracking_uri=tracking_uri_for(config, out=out))
    say(f"federated job: {len(config.members)} members x {total} rounds in {env} (HE {'on' if he else 'off'})")
    federated = run_federated(config, env=env, out=out, rounds=total, he=he, progress=progress, **he_options)

    truth = _ground_truth(config)
    report = _federated_report(config, federated, truth=truth)
    trunk = shared_trunk_state(config, federated)
    if he:
        _ciphertext_bytes(report, trunk, public_context=he_options["he_contexts"][1])
    for summary in report["rounds"]:
        audit.append(
            EVENT_ROUND_COMPLETED,
            job_id=federated.job_id,
            round=summary["round"],
            bytes_sent=summary["bytes_sent"],
            sites=sorted(summary["sites"]),
        )
    if baselines:
        say("baselines: each member alone, then all members pooled")
        _add_baselines(config, report, truth=truth)

    consensus = pd.DataFrame(report["biomarkers"]["consensus"])
    report["tracking"]["model_run_id"] = log_shared_model(
        config, trunk, consensus=consensus, report=report, tracking_uri=federated.tracking_uri
    )
    report_path, md_path = write_report(report, out)
    audit.append(
        EVENT_MODEL_RELEASED,
        job_id=federated.job_id,
        model_run_id=report["tracking"]["model_run_id"],
        trunk_sha256=_digest(trunk),
    )
    return RunResult(report=report, report_path=report_path, markdown_path=md_path, federated=federated)


def _he_ceremony(config: ConsortiumConfig, out: Path, audit: AuditLog) -> dict[str, Any]:
    """The key custodian's step, done here because one machine plays every role in a POC run.

    In production the custodian runs ``consortium keys create`` on a member's machine and installs the
    contexts into the kits (docs/key_ceremony.md); the operator only ever receives the public context.
    """
    folder = out / "he_keys"
    secret, public = folder / CLIENT_CONTEXT, folder / SERVER_CONTEXT
    if secret.exists() and public.exists():
        # one key pair for the consortium: a later run in the same folder keeps it
        audit.append(EVENT_KEYS_REUSED, fingerprint=public_fingerprint(load_context(public)))
    else:
        keys = create_keys(config.privacy.he, out=folder)
        audit.append(EVENT_KEYS_CREATED, fingerprint=keys.fingerprint, custodian="all roles on this machine (POC)")
    return {"he_contexts": (secret.read_bytes(), public.read_bytes()), "privacy_policy": privacy_policy(config)}


def _ciphertext_bytes(report: dict[str, Any], trunk: dict[str, Any], *, public_context: bytes) -> None:
    """Under HE the wire carries ciphertexts, not the fp32 trunk: measure them by encrypting the trunk
    once more with the public context, exactly as a member's filter packs it."""
    from jobs.he.context import context_from_bytes
    from jobs.he.payload import encrypt_update

    context = context_from_bytes(public_context, source="server_context.tenseal", private=False)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in trunk.items()}
    upload = encrypt_update(context, params, weight=1.0).n_bytes
    timing = report["timing"]
    n_parameters = sum(v.size for v in params.values())
    timing["plaintext_trunk_bytes"] = int(sum(v.nbytes for v in params.values()))
    timing["bytes_sent_per_round_per_member"] = {m: upload for m in timing["bytes_sent_per_round_per_member"]}
    timing["bytes_sent_per_round"] = upload * len(timing["bytes_sent_per_round_per_member"])
    timing["ciphertext_bytes_per_parameter"] = upload / n_parameters
    for summary in report["rounds"]:
        summary["bytes_sent"] = upload * len(summary["sites"])
        for site in summary["sites"].values():
            site["bytes_sent"] = upload


def _ground_truth(config: ConsortiumConfig) -> dict[str, list[str]] | None:
    path = config.source.parent / "ground_truth.json" if config.source else None
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text()).get("tasks")


def _federated_report(config: ConsortiumConfig, run: FederatedRun, *, truth: dict | None) -> dict[str, Any]:
    members: dict[str, Any] = {}
    tables, weights, task_tables = [], [], {}
    for member in config.members:
        records = run.metrics[member.name]
        final = records[-1]["test"] if records else {}
        rankings = read_rankings(run.site_outputs[member.name])
        tasks = {}
        for task in member.tasks:
            metric = primary_metric(task.type)
            entry: dict[str, Any] = {
                "type": task.type,
                "metric": metric,
                "federated": final.get(task.name, {}).get(metric),
            }
            if task.name in rankings:
                task_tables[task.name] = rankings[task.name]
                tables.append(rankings[task.name])
                weights.append(1.0)
                if truth and task.name in truth:
                    entry["precision_at_k"] = {"federated": precision_at_k(rankings[task.name], truth[task.name])}
            tasks[task.name] = entry
        members[member.name] = {"tasks": tasks}
    consensus = (
        consensus_ranking(tables, weights=weights) if tables else pd.DataFrame(columns=["feature", "score", "rank"])
    )
    rounds = round_summary(run.metrics)
    per_member_bytes = {m: int(np.mean([r["bytes_sent"] for r in recs])) for m, recs in run.metrics.items() if recs}
    epsilon = {m: recs[-1].get("epsilon") for m, recs in run.metrics.items() if recs and recs[-1].get("epsilon")}
    report: dict[str, Any] = {
        "consortium": config.name,
        "job_id": run.job_id,
        "env": run.env,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": members,
        "definitions": DEFINITIONS,
        "biomarkers": {
            "consensus": ranking_records(consensus),
            "tasks": {name: ranking_records(table) for name, table in task_tables.items()},
        },
        "rounds": rounds,
        "privacy": {
            "he": run.he,
            "he_scheme": (
                f"CKKS N={config.privacy.he.poly_modulus_degree}, "
                f"coeff_mod_bit_sizes={config.privacy.he.coeff_mod_bit_sizes}"
            )
            if run.he
            else None,
            "dp": config.privacy.dp.enabled,
            "epsilon_spent": epsilon or None,
            "epsilon_target": config.privacy.dp.epsilon if config.privacy.dp.enabled else None,
            "delta": config.privacy.dp.delta if config.privacy.dp.enabled else None,
            "shared": (
                "model: trunk parameters only (encrypted when he is on); task heads and data stay at each "
                "member. In plaintext, outside HE and outside the DP budget: each round's training loss and "
                "per-task validation/test metrics, and at the end each task's biomarker ranking"
            ),
            "dp_guarantee": _dp_guarantee(config),
        },
        "timing": {
            "rounds": run.rounds,
            "seconds_total": run.seconds,
            "seconds_per_round": run.seconds / max(run.rounds, 1),
            "site_seconds_per_round": float(np.mean([r["seconds"] for r in rounds])) if rounds else None,
            "bytes_sent_per_round": int(np.mean([r["bytes_sent"] for r in rounds])) if rounds else 0,
            "bytes_sent_per_round_per_member": per_member_bytes,
        },
        "tracking": {"uri": run.tracking_uri, "experiment": config.tracking.experiment},
    }
    if truth:
        report["biomarkers"]["ground_truth"] = truth
        planted = {f for features in truth.values() for f in features}
        top = [row["feature"] for row in report["biomarkers"]["consensus"][: len(planted)]]
        report["biomarkers"]["consensus_planted_in_top"] = {
            "k": len(planted),
            "planted": sum(f in planted for f in top),
        }
    return report


def _dp_guarantee(config: ConsortiumConfig) -> str | None:
    if not config.privacy.dp.enabled:
        return None
    survival = sorted(t.name for t in config.tasks if t.type == "survival")
    if not survival:
        return "DP-SGD (Opacus) over all planned rounds: (epsilon, delta) for the model updates"
    log.warning("DP-SGD with survival tasks %s: the Cox loss couples the samples of a batch", survival)
    return (
        "DP-SGD (Opacus) over all planned rounds. Not a formal guarantee for survival tasks "
        f"{survival}: the Cox partial likelihood couples the samples of a batch, so per-sample clipping "
        "does not bound one patient's influence on the update"
    )


def _add_baselines(config: ConsortiumConfig, report: dict[str, Any], *, truth: dict | None) -> None:
    """Local-only and pooled test metrics (and biomarker precision) on the same splits as the federated run."""
    started = time.perf_counter()
    settings = member_data.train_settings(config)
    settings = type(settings)(**{**settings.__dict__, "epochs": BASELINE_MAX_EPOCHS})
    network = member_data.network_kwargs(config)
    data = {m.name: member_data.load_member_data(config, m.name) for m in config.members}
    tasks = member_data.all_task_specs(config)
    pooled = train_pooled(data, tasks, settings=settings, network=network)
    for name, member_tasks in tasks.items():
        local = train_local(data[name], member_tasks, settings=settings, network=network)
        train_x = data[name].subset("train").X
        features = data[name].feature_names
        report["members"][name]["samples"] = int(len(data[name].X))
        for task in member_tasks:
            entry = report["members"][name]["tasks"][task.name]
            metric = entry["metric"]
            entry["local"] = local.metrics[task.name][metric]
            entry["pooled"] = pooled.metrics[name][task.name][metric]
            if truth and task.name in truth:
                for label, model in (("local", local.model), ("pooled", pooled.model)):
                    table = rank_features(model, train_x, task.name, feature_names=features)
                    entry.setdefault("precision_at_k", {})[label] = precision_at_k(table, truth[task.name])
    report["timing"]["baseline_seconds"] = time.perf_counter() - started
    report["summary"] = summarize(report)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per member: the mean over its tasks of federated, local and pooled; and federated - pooled overall."""
    per_member, gaps = {}, []
    for name, info in report["members"].items():
        rows = [t for t in info["tasks"].values() if t.get("local") is not None and t.get("federated") is not None]
        if not rows:
            continue
        mean = {k: float(np.mean([t[k] for t in rows])) for k in ("local", "federated", "pooled")}
        mean["federated_minus_local"] = mean["federated"] - mean["local"]
        per_member[name] = mean
        gaps += [t["federated"] - t["pooled"] for t in rows]
    return {"per_member": per_member, "federated_minus_pooled": float(np.mean(gaps)) if gaps else None}


def _digest(state: dict[str, Any]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(np.asarray(state[key], dtype=np.float32)).tobytes())
    return digest.hexdigest()
