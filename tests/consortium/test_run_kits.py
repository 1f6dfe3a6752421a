"""``consortium run --env kits``: a job submitted to a running consortium of provisioned startup kits
through a member lead's admin kit, followed to its end and released from what FLARE hands the admin.

The fast tests: what the run plan refuses (exit 2, nothing written) and the job as a lead submits it on
kits (no code, no path of this machine). The slow one starts a provisioned consortium on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from consortium.backends import kits
from consortium.backends.admin_kit import AdminKit, member_context
from consortium.backends.kits import KitsBackend, kits_job, without_machine_paths
from consortium.cli import main
from consortium.flare_env import FederatedRunError
from schema.config import load_config
from schema.names import CLIENT_CONTEXT_FILE
from tests.helpers import console_script, free_ports, running_kits


def _config(tmp_path: Path, raw: dict, **changes) -> Path:
    (tmp_path / "m.h5ad").unlink()  # no data: a data check reached would fail (exit 1), not the plan
    raw = {**raw, **changes}
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _admin_kit(folder: Path) -> Path:
    (folder / "startup").mkdir(parents=True)
    (folder / "startup" / "fed_admin.json").write_text("{}")
    return folder


def test_kits_without_a_startup_kit_exits_2_writing_nothing(small_config_dict, tmp_path, capsys):
    config = _config(tmp_path, small_config_dict)
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--env", "kits", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--env kits" in err and "--startup-kit" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--startup-kit", "{tmp}/nokit"], "no startup/fed_admin.json"),
        (["--startup-kit", "{kit}", "--no-he"], "HE off"),
        (["--startup-kit", "{kit}", "--baselines"], "--baselines with --env kits"),
        (["--startup-kit", "{kit}", "--folds", "2"], "--folds with --env kits"),
        (["--startup-kit", "{kit}", "--seeds", "2"], "--seeds with --env kits"),
        (["--startup-kit", "{kit}"], "cannot open the encrypted aggregate"),  # no member kit beside it
        (["--env", "poc", "--startup-kit", "{kit}"], "give --env kits"),
    ],
)
def test_what_kits_cannot_do_here_exits_2_writing_nothing(small_config_dict, tmp_path, capsys, extra, named):
    config = _config(tmp_path, small_config_dict, privacy={"he": {"enabled": True}})
    kit = _admin_kit(tmp_path / "kits" / "lead@m1.org")
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path, kit=kit) for a in extra]
    env = [] if "--env" in args else ["--env", "kits"]
    code = main(["run", "--config", str(config), *env, "--out", str(out), *args])
    assert code == 2
    assert named in " ".join(capsys.readouterr().err.split())  # the console may wrap at a terminal's width
    assert not out.exists()


def test_the_lead_member_kit_beside_the_admin_kit_opens_the_aggregate(small_config_dict, tmp_path):
    config = load_config(_config(tmp_path, small_config_dict))
    lead = AdminKit.at(_admin_kit(tmp_path / "kits" / "lead@m1.org"))
    assert lead.username == "lead@m1.org"
    assert member_context(lead, config) is None
    secret = tmp_path / "kits" / "m1" / "startup" / CLIENT_CONTEXT_FILE
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"context")
    assert member_context(lead, config) == secret
    other = AdminKit.at(lead.folder, username="someone@else.org")  # not m1's lead: m1's kit is not theirs
    assert member_context(other, config) is None


def test_a_kits_job_ships_no_code_and_names_no_path_of_this_machine(small_config_dict, tmp_path):
    from jobs.recipe import build_recipe

    config = load_config(_config(tmp_path, small_config_dict))

    recipe = build_recipe(
        config,
        he=True,
        config_path=tmp_path / "consortium.yaml",
        outputs=tmp_path / "sites",
        fold=None,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    job = kits_job(recipe, tmp_path / "jobs", config=config)
    assert not list(job.rglob("custom"))
    exported = "\n".join(p.read_text() for p in job.rglob("*.json"))
    assert str(tmp_path) not in exported
    assert json.loads((job / "meta.json").read_text())["scope"] == "consortium-he"
    assert without_machine_paths("--fold 1 --config /a/c.yaml --outputs /a/sites --first-round 2") == (
        "--fold 1 --first-round 2"
    )


class _Job:
    """A submitted job as ``nvflare.recipe.Run`` reports it: ``statuses`` in turn, then the last one again."""

    def __init__(self, *statuses: str | None) -> None:
        self.statuses, self.aborted = list(statuses), False

    def get_status(self) -> str | None:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def abort(self) -> None:
        self.aborted = True


def _followed(tmp_path: Path, config, job: _Job, *, rounds: int = 2):
    backend = KitsBackend(config, tmp_path / "flare", kit=AdminKit.at(_admin_kit(tmp_path / "kits" / "lead@m1.org")))
    backend._run, backend._job_id, backend._rounds = job, "job-1", rounds  # as submit leaves them
    return backend


def test_a_kits_job_past_its_deadline_is_aborted(small_config_dict, tmp_path, monkeypatch):
    monkeypatch.setattr(kits, "POLL_SECONDS", 0.05)
    config = load_config(_config(tmp_path, small_config_dict, training={"round_deadline": 0.1}))
    job = _Job("RUNNING")
    backend = _followed(tmp_path, config, job)
    assert backend.deadline(3600.0) == pytest.approx(kits.JOB_START_SECONDS + 0.2)
    with pytest.raises(FederatedRunError, match="did not finish within 1 s") as failed:
        backend.wait(timeout=1.0)
    assert job.aborted and failed.value.job_id == "job-1" and "nvflare job logs job-1" in str(failed.value)


def test_a_kits_job_whose_server_stops_answering_is_ended(small_config_dict, tmp_path, monkeypatch):
    monkeypatch.setattr(kits, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(kits, "UNREACHABLE_SECONDS", 0.3)
    job = _Job("RUNNING", None)  # Run.get_status answers None when the server cannot be reached
    backend = _followed(tmp_path, load_config(_config(tmp_path, small_config_dict)), job)
    with pytest.raises(FederatedRunError, match="has not answered about job job-1"):
        backend.wait(timeout=60.0)
    assert job.aborted


def test_a_kits_job_that_ends_otherwise_names_its_status(small_config_dict, tmp_path, monkeypatch):
    monkeypatch.setattr(kits, "POLL_SECONDS", 0.05)
    job = _Job("RUNNING", "FINISHED:EXECUTION_EXCEPTION")
    backend = _followed(tmp_path, load_config(_config(tmp_path, small_config_dict)), job)
    with pytest.raises(FederatedRunError, match="ended with status FINISHED:EXECUTION_EXCEPTION"):
        backend.wait(timeout=60.0)
    backend.close(failed=True)
    assert not job.aborted  # an ended job is not aborted again


@pytest.mark.slow
def test_a_run_on_running_provisioned_kits(tmp_path):
    from consortium.audit import verify_log
    from consortium.commands.synth import synthesize

    rounds = 2
    cfg = synthesize(tmp_path / "c", sizes=[120, 150], n_features=150, seed=1, rounds=rounds)
    raw = yaml.safe_load(cfg.read_text())
    fl_port, admin_port = free_ports(2)
    raw["operator"] = {**raw["operator"], "fl_port": fl_port, "admin_port": admin_port}
    raw["privacy"]["he"]["enabled"] = True
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    kits, out = tmp_path / "kits", tmp_path / "run"
    with running_kits(cfg, kits) as config:
        lead = config.members[0]
        admin = kits / (lead.admin or f"lead@{lead.name}.org")
        done = console_script(
            ["run", "--config", str(cfg), "--env", "kits", "--startup-kit", str(admin), "--out", str(out), "--json"],
            timeout=540,
        )
    assert done.returncode == 0, done.stderr[-4000:] + (out / "console.log").read_text(errors="replace")[-4000:]
    result = json.loads(done.stdout)
    [job_id] = result["job_ids"]
    report = json.loads((out / "report.json").read_text())
    assert report["env"] == "kits" and report["privacy"]["he"] is True and report["job_id"] == job_id
    assert len(report["rounds"]) == rounds
    assert (out / "report.md").is_file()
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events[:2] == ["keys_reused", "job_submitted"] and events[-1] == "model_released"
    assert events.count("round_completed") == rounds
    assert verify_log(out / "audit.jsonl").ok
    # the job's result came back to the admin kit; no site's outputs are in the run folder
    assert (admin / "transfer" / job_id).is_dir()
    assert not (out / "sites").exists()
