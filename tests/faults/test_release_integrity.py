"""``consortium release`` verifies what it opens: the job named, one job, the server's digests, the key,
plausible counts. Every refusal exits 1 naming what differs and writes nothing (no audit entry, no MLflow
store, no file in --out); a release that passes writes as before.

One finished job, made once for the module in FLARE's simulator (plaintext), serves every case; the
encrypted cases re-encrypt its aggregate under a key pair of the consortium's CKKS settings, as the
operator's server would have stored it (the fingerprint in its header, a round in its digests).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from consortium.audit import verify_log
from consortium.cli import main
from jobs.aggregation import SectionAggregatePersistor
from jobs.he.context import make_contexts, public_fingerprint
from jobs.he.payload import encrypt_update
from jobs.published import DIGESTS_FILE, KIND_ROUND, RECORDS_LOCK, append_digest, file_digest, records_digest
from jobs.recipe import job_name
from jobs.sections import weighted_update
from jobs.store import read_aggregate, write_aggregate
from provisioning import he_keys
from schema.config import load_config
from schema.names import CLIENT_CONTEXT_FILE, GLOBAL_MODEL_FILE, PUBLISHED_FILE, SERVER_CONTEXT_FILE
from tests.helpers import relocated_config

pytestmark = pytest.mark.fault
ROUNDS = 2


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def finished(tiny_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(consortium.yaml, run folder)`` of a 2-round plaintext job run in the simulator."""
    out = tmp_path_factory.mktemp("integrity_run")
    config = relocated_config(tiny_consortium, out)
    args = ["run", "--config", str(config), "--env", "sim", "--out", str(out), "--rounds", str(ROUNDS), "--no-he"]
    done = subprocess.run([sys.executable, "-m", "consortium.cli", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return config, out


def _job_name(config: Path) -> str:
    return job_name(load_config(config))


def _server_run(run: Path) -> Path:
    """The server's run folder of the job in the simulator's workspace (published.jsonl, digests.jsonl)."""
    [published] = (run / "flare").rglob(PUBLISHED_FILE)
    return published.parent


def _job_copy(finished: tuple[Path, Path], dest: Path) -> Path:
    """A copy of the job's server run folder, as a member's custodian would receive it."""
    return Path(shutil.copytree(_server_run(finished[1]), dest))


def _release(config: Path, job: str, job_dir: Path, out: Path, capsys, *more: str) -> tuple[int, str]:
    code = main(["release", "--config", str(config), "--job", job, "--job-dir", str(job_dir), "--out", str(out), *more])
    return code, _flat(capsys.readouterr().err)


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def _keys(folder: Path, config: Path) -> tuple[Path, ts.Context]:
    """A fresh key pair of the consortium's CKKS settings: its secret context's folder and the context."""
    secret, _ = make_contexts(load_config(config).privacy.he)
    folder.mkdir(parents=True)
    (folder / CLIENT_CONTEXT_FILE).write_bytes(secret)
    return folder, ts.context_from(secret)


def _encrypt_stored(job: Path, context: ts.Context, *, fingerprint: str) -> None:
    """Re-store the job's aggregate as ciphertext under ``context``, recording ``fingerprint``, and record
    the round in the job's digests as the server does when it stores a round."""
    [path] = job.rglob(GLOBAL_MODEL_FILE)
    stored = read_aggregate(path)
    update = encrypt_update(context, stored.params, meta=stored.meta)
    write_aggregate(path, meta=update.meta, encrypted=update, round_=stored.round, he_fingerprint=fingerprint)
    digest = file_digest(path)
    with RECORDS_LOCK:
        receipt = {"kind": KIND_ROUND, "round": stored.round, "aggregate_sha256": digest["sha256"]}
        append_digest(job, {**receipt, **records_digest(job)})


# -- what the job used, recorded where the release can check it ---------------------------------------


def test_a_secret_context_has_the_fingerprint_of_its_public_half(tmp_path: Path):
    secret, public = make_contexts()
    fingerprint = public_fingerprint(ts.context_from(public))
    assert public_fingerprint(ts.context_from(secret)) == fingerprint
    assert he_keys.public_fingerprint(ts.context_from(secret)) == fingerprint  # the key ceremony's value
    assert public_fingerprint(ts.context_from(make_contexts()[0])) != fingerprint


class _Engine:
    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def get_workspace(self) -> Workspace:
        return self.workspace


def test_the_server_stores_the_key_fingerprint_and_its_receipt_of_each_round(tmp_path: Path):
    secret, public = make_contexts()
    for folder in ("startup", "local"):
        (tmp_path / folder).mkdir()
    (tmp_path / "startup" / SERVER_CONTEXT_FILE).write_bytes(public)
    workspace = Workspace(root_dir=str(tmp_path))
    run = Path(workspace.get_run_dir("job-7"))
    (run / "app_server").mkdir(parents=True)
    (run / PUBLISHED_FILE).write_text('{"site": "m1", "round": 3}\n')
    fl_ctx = FLContext()
    fl_ctx.put(ReservedKey.ENGINE, _Engine(workspace), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.CURRENT_JOB_ID, "job-7", private=True, sticky=False)

    params, meta = weighted_update({"trunk.0.bias": np.ones(8)}, weights={"trunk": 2.0})
    dxo = encrypt_update(ts.context_from(secret), params, meta={**meta, AppConstants.CURRENT_ROUND: 3}).to_dxo()
    persistor = SectionAggregatePersistor(model=None)
    persistor.log_dir = str(run / "app_server")
    persistor.save_model(make_model_learnable(weights=dict(dxo.data), meta_props=dict(dxo.meta)), fl_ctx)

    stored = run / "app_server" / GLOBAL_MODEL_FILE
    assert read_aggregate(stored).he_fingerprint == public_fingerprint(ts.context_from(secret))
    [receipt] = [json.loads(line) for line in (run / DIGESTS_FILE).read_text().splitlines()]
    assert receipt["kind"] == KIND_ROUND and receipt["round"] == 3
    assert receipt["aggregate_sha256"] == file_digest(stored)["sha256"]
    assert receipt["published_sha256"] == file_digest(run / PUBLISHED_FILE)["sha256"]


@pytest.mark.slow
def test_the_run_audits_the_servers_digests_of_every_round(finished):
    _, run = finished
    server = _server_run(run)
    digests = [json.loads(line) for line in (server / DIGESTS_FILE).read_text().splitlines()]
    rounds = {d["round"]: d for d in digests if d["kind"] == KIND_ROUND}
    assert sorted(rounds) == list(range(ROUNDS))
    [stored] = server.rglob(GLOBAL_MODEL_FILE)
    assert rounds[ROUNDS - 1]["aggregate_sha256"] == file_digest(stored)["sha256"]
    assert digests[-1]["published_sha256"] == file_digest(server / PUBLISHED_FILE)["sha256"]  # every record

    entries = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    completed = [e["details"] for e in entries if e["event"] == "round_completed"]
    assert [c["round"] for c in completed] == list(range(ROUNDS))
    for entry in completed:
        assert entry["aggregate_sha256"] == rounds[entry["round"]]["aggregate_sha256"]
        assert entry["published_sha256"] == rounds[entry["round"]]["published_sha256"]
    [submitted] = [e["details"] for e in entries if e["event"] == "job_submitted"]
    assert submitted["he"] is False and submitted["he_fingerprint"] is None


# -- the release verifies before it writes ---------------------------------------------------------


@pytest.mark.slow
def test_a_clean_release_exits_0_and_audits_what_it_checked(finished, tmp_path, capsys):
    config, run = finished
    workspace = run / "flare" / _job_name(config)  # the simulator's workspace of the job, as the run left it
    out = tmp_path / "out"
    code, err = _release(config, _job_name(config), workspace, out, capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["job_id"] == _job_name(config)
    assert (out / "mlflow.db").exists()
    assert verify_log(out / "audit.jsonl").ok
    entries = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["job_submitted", *["round_completed"] * ROUNDS, "model_released"]
    digests = [json.loads(line) for line in (_server_run(run) / DIGESTS_FILE).read_text().splitlines()]
    rounds = {d["round"]: d for d in digests if d["kind"] == KIND_ROUND}
    for entry in entries[1 : 1 + ROUNDS]:
        assert entry["details"]["aggregate_sha256"] == rounds[entry["details"]["round"]]["aggregate_sha256"]


@pytest.mark.slow
def test_another_key_pair_of_the_same_settings_is_refused_and_the_right_one_releases(finished, tmp_path, capsys):
    config, _ = finished
    job = _job_copy(finished, tmp_path / "job")
    right, context = _keys(tmp_path / "KEYS", config)
    wrong, other = _keys(tmp_path / "OTHER_KEYS", config)
    _encrypt_stored(job, context, fingerprint=public_fingerprint(context))
    out = tmp_path / "out"

    code, err = _release(config, _job_name(config), job, out, capsys, "--keys", str(wrong))
    assert code == 1
    assert (
        f"the key in {wrong / CLIENT_CONTEXT_FILE} has fingerprint {public_fingerprint(other)[:16]}..., the job was "
        f"encrypted for {public_fingerprint(context)[:16]}...: use the key of the ceremony this consortium's kits "
        "were provisioned with" in err
    )
    assert _nothing_written(out)

    code, err = _release(config, _job_name(config), job, out, capsys, "--keys", str(right))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["biomarkers"]["statistics"]  # decrypted: the counts passed the plausibility check
    submitted = json.loads((out / "audit.jsonl").read_text().splitlines()[0])["details"]
    assert submitted["he_fingerprint"] == public_fingerprint(context)


@pytest.mark.slow
def test_counts_a_key_cannot_have_opened_are_refused(finished, tmp_path, capsys):
    """An aggregate encrypted under one key but recording another's fingerprint: the fingerprint passes,
    what the key opens is noise, and the release refuses it before anything is written."""
    config, _ = finished
    job = _job_copy(finished, tmp_path / "job")
    keys, context = _keys(tmp_path / "KEYS", config)
    _, other = _keys(tmp_path / "OTHER_KEYS", config)
    _encrypt_stored(job, other, fingerprint=public_fingerprint(context))
    out = tmp_path / "out"
    code, err = _release(config, _job_name(config), job, out, capsys, "--keys", str(keys))
    assert code == 1
    assert "the opened aggregate is implausible:" in err and "it was opened with the wrong key" in err
    assert re.search(r"\.(members|samples) holds", err), err
    assert _nothing_written(out)


@pytest.mark.slow
def test_a_record_edited_by_one_byte_is_refused(finished, tmp_path, capsys):
    config, _ = finished
    job = _job_copy(finished, tmp_path / "job")
    published = job / PUBLISHED_FILE
    *earlier, last = published.read_text().splitlines(keepends=True)
    digit = re.search(r'"test": \{.*?"auroc": 0\.(\d)', last).start(1)  # a test metric, one digit up
    published.write_text("".join([*earlier, last[:digit], str((int(last[digit]) + 1) % 10), last[digit + 1 :]]))
    out = tmp_path / "out"
    code, err = _release(config, _job_name(config), job, out, capsys)
    assert code == 1
    assert f"{published}: its sha256" in err and "the records were edited or come from another job" in err
    assert _nothing_written(out)


@pytest.mark.slow
def test_an_aggregate_edited_by_one_byte_is_refused(finished, tmp_path, capsys):
    config, _ = finished
    job = _job_copy(finished, tmp_path / "job")
    [stored] = job.rglob(GLOBAL_MODEL_FILE)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = _release(config, _job_name(config), job, out, capsys)
    assert code == 1
    assert f"{stored}: its sha256" in err and "the aggregate was altered or comes from another job" in err
    assert _nothing_written(out)


@pytest.mark.slow
def test_a_folder_holding_two_jobs_is_refused_with_the_list(finished, tmp_path, capsys):
    config, run = finished
    out = tmp_path / "out"
    code, err = _release(config, _job_name(config), run, out, capsys)  # the whole run folder
    assert code == 1
    assert f"--job-dir {run}: holds 2 jobs' server folders, not one:" in err
    assert str(_server_run(run)) in err and str(run / "jobs" / "seed0" / "part00") in err
    assert _nothing_written(out)


@pytest.mark.slow
def test_a_job_id_the_folder_does_not_hold_is_refused(finished, tmp_path, capsys):
    config, _ = finished
    job = _job_copy(finished, tmp_path / "job")
    out = tmp_path / "out"
    code, err = _release(config, "b2c0a1e4-another-job", job, out, capsys)
    assert code == 1
    name = _job_name(config)
    assert f"--job b2c0a1e4-another-job: {job} holds job {name}" in err and f"give --job {name}" in err
    assert _nothing_written(out)
