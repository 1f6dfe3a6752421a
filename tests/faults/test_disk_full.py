"""A full disk (and the other OS errors of a write) said in words, naming the folder, with nothing
half-written left behind: the helper with a faked ``ENOSPC``, then the run's writers and
``consortium keys create`` on a real 64 KiB tmpfs (as root; skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

import schema.writes
from consortium.audit import AuditLog, verify_log
from consortium.cli import main
from consortium.report import write_biomarker_tables
from consortium.run_state import STATE_FILE, RunState
from jobs.site_outputs import SiteOutputs
from schema.writes import WriteError, atomic_write, writing

pytestmark = pytest.mark.fault

NO_SPACE = "No space left on device"
CONFIG = {
    "name": "demo",
    "operator": {"org": "neutral_op", "host": "localhost", "fl_port": 8102, "admin_port": 8103},
    "panel": {"features": ["TP53", "EGFR"]},
    "members": [
        {
            "name": "pharma-a",
            "org": "pharma_a",
            "data": "a.h5ad",
            "tasks": [{"name": "resp", "type": "binary", "column": "response"}],
        },
    ],
    "privacy": {"he": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 20, 40], "global_scale_bits": 20}},
}


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the helper, with the error faked ---------------------------------------------------------------


def test_full_disk_keeps_the_previous_file_and_names_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write(path, '{"old": true}')
    monkeypatch.setattr(os, "write", _no_space)
    with pytest.raises(WriteError) as caught:
        atomic_write(path, '{"new": true}')
    assert str(caught.value) == (
        f"{tmp_path}: {NO_SPACE} (errno ENOSPC) while writing report.json; free space or choose another --out"
    )
    assert caught.value.exit_code == 2 and caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}'
    assert _listing(tmp_path) == ["report.json"]  # no temp file


def test_a_failed_replace_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(WriteError, match=f"{tmp_path}: {NO_SPACE} .*while writing run_state.json"):
        atomic_write(tmp_path / "run_state.json", "{}")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EACCES, "free space or choose another --out"),
        (errno.EROFS, "free space or choose another --out"),
        (errno.EDQUOT, "free space or choose another --out"),
        (errno.EIO, "check the folder (its disk, its permissions) or choose another --out"),
    ],
)
def test_each_errno_in_words(tmp_path, monkeypatch, code, fix):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", fail)
    with pytest.raises(WriteError) as caught:
        atomic_write(tmp_path / "x.csv", "a,b\n")
    name = errno.errorcode[code]
    assert str(caught.value) == f"{tmp_path}: {os.strerror(code)} (errno {name}) while writing x.csv; {fix}"
    assert _listing(tmp_path) == []


def test_a_library_error_without_errno_on_a_full_disk(tmp_path, monkeypatch):
    """SEAL says "basic_ios::clear: iostream error", torch "PytorchStreamWriter failed": on a folder
    with no space left, that is the full disk."""
    monkeypatch.setattr(schema.writes, "_free_bytes", lambda folder: 0)
    expected = f"{tmp_path}: {NO_SPACE} \\(errno ENOSPC\\) while writing model.pt"
    with pytest.raises(WriteError, match=expected), writing(tmp_path / "model.pt") as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("basic_ios::clear: iostream error")
    assert _listing(tmp_path) == []


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="a bug"), writing(tmp_path / "plot.png") as temp:
        temp.write_bytes(b"half")
        raise ValueError("a bug")
    assert _listing(tmp_path) == []


def test_writing_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with writing(tmp_path / "predictions.npz") as temp:
        assert temp.suffix == ".npz" and temp.parent == tmp_path
        np.savez(temp, a=np.arange(3))
    assert _listing(tmp_path) == ["predictions.npz"]
    assert np.load(tmp_path / "predictions.npz")["a"].tolist() == [0, 1, 2]


def test_a_secret_is_written_private(tmp_path):
    atomic_write(tmp_path / "client_context.tenseal", b"secret", mode=0o600)
    assert (tmp_path / "client_context.tenseal").stat().st_mode & 0o777 == 0o600


def test_the_audit_log_gets_no_torn_line(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("first")
    before = (tmp_path / "audit.jsonl").read_bytes(), (tmp_path / "audit.jsonl.head").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # half the line gets out, then the disk is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(WriteError, match=f"{tmp_path}: {NO_SPACE} .*while writing audit.jsonl"):
        log.append("second", big="x" * 1000)
    monkeypatch.undo()
    assert ((tmp_path / "audit.jsonl").read_bytes(), (tmp_path / "audit.jsonl.head").read_bytes()) == before
    assert verify_log(tmp_path / "audit.jsonl").ok
    log.append("third")  # the log goes on where it was
    assert [e["event"] for e in log.entries()] == ["first", "third"]


# --- a real full disk: a 64 KiB tmpfs ------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs under tmp_path, unmounted afterwards; skipped where mounting is not permitted."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root and mount(8); the faked ENOSPC tests cover the helper")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_run_state_on_a_full_disk(tiny_disk):
    RunState(arguments={"rounds": 1}).save(tiny_disk)
    before = (tiny_disk / STATE_FILE).read_text()
    with pytest.raises(WriteError) as caught:
        RunState(arguments={"rounds": 1, "note": "x" * 200_000}).save(tiny_disk)
    assert str(caught.value) == (
        f"{tiny_disk}: {NO_SPACE} (errno ENOSPC) while writing {STATE_FILE}; free space or choose another --out"
    )
    assert (tiny_disk / STATE_FILE).read_text() == before
    assert _listing(tiny_disk) == [STATE_FILE]


def test_biomarker_tables_and_site_outputs_on_a_full_disk(tiny_disk):
    big = pd.DataFrame({"feature": [f"GENE{i}" for i in range(20_000)], "score": np.linspace(0, 1, 20_000)})
    released = SimpleNamespace(statistics={"resp": big}, rankings={})
    with pytest.raises(WriteError, match=f"{tiny_disk / 'biomarkers'}: {NO_SPACE} .*statistics_resp.csv"):
        write_biomarker_tables(released, tiny_disk / "biomarkers")
    assert _listing(tiny_disk / "biomarkers") == []
    site = SiteOutputs(tiny_disk / "pharma-a")
    with pytest.raises(WriteError, match=f"{NO_SPACE} \\(errno ENOSPC\\) while writing round-1.pt"):
        site.save_checkpoint({"weights": np.zeros(50_000)}, round_=1)
    with pytest.raises(WriteError, match=f"{NO_SPACE} \\(errno ENOSPC\\) while writing predictions.npz"):
        site.save_predictions({"resp": np.zeros(50_000)}, targets={"resp": np.zeros(50_000)})
    assert _listing(tiny_disk / "pharma-a") == []


def test_keys_create_on_a_full_disk(tiny_disk, tmp_path, capsys):
    """TenSEAL's contexts (190 KB and more) do not fit: a clear message and exit 2, no traceback, no key file."""
    config = tmp_path / "consortium.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    keys = tiny_disk / "keys"
    code = main(["keys", "create", "--config", str(config), "--out", str(keys)])
    captured = capsys.readouterr()
    output = " ".join((captured.out + captured.err).split())  # rich wraps long lines
    assert code == 2
    assert f"{keys}: {NO_SPACE} (errno ENOSPC) while writing client_context.tenseal" in output
    assert "free space or choose another --out" in output
    assert "Traceback" not in output and "basic_ios" not in output
    assert _listing(keys) == []  # no half key pair, no temp file
