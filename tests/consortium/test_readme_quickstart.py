"""The README's quick start runs verbatim, and the README stays a five-minute read.

The shell blocks between ``<!-- quickstart-example-data -->`` and ``<!-- quickstart -->`` markers in
README.md are run as they are written, with bash in an empty folder and this virtualenv's ``bin`` first
on ``PATH``: the example-data block puts two synthetic members where the README tells users to put
theirs, then the quick start (init, data check, stats, run, score, release) runs on them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from consortium.audit import verify_log

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_WORDS = 1500  # issue 23: a newcomer reads it in five minutes
JOB = "my-consortium-biomarker-mtl"  # the job of the consortium 'consortium init' names


def _shell(marker: str) -> str:
    """The bash blocks of README.md between ``<!-- marker -->`` and ``<!-- /marker -->``, joined."""
    section = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", README.read_text(), re.S)
    assert section, f"README.md: no '<!-- {marker} -->' ... '<!-- /{marker} -->' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    assert blocks, f"README.md: the '{marker}' section holds no ```bash block"
    return "\n".join(blocks)


def test_the_readme_is_under_1500_words_and_marks_its_quick_start():
    words = len(README.read_text().split())  # as `wc -w` counts them
    assert words < MAX_WORDS, f"README.md has {words} words; move detail to docs/ (benchmarks.md, statistics.md)"
    quickstart = _shell("quickstart")
    for step in ("consortium init", "consortium data check", "consortium stats", "consortium run"):
        assert step in quickstart
    assert "consortium score" in quickstart and "consortium release" in quickstart


@pytest.mark.slow
def test_the_readme_quick_start_runs_verbatim(tmp_path: Path):
    script = "\n".join(["set -euo pipefail", _shell("quickstart-example-data"), _shell("quickstart")])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"

    # the statistics find the features planted in the example members' response
    planted = json.loads((tmp_path / "example" / "ground_truth.json").read_text())["tasks"]
    planted = set(planted["a_response"]) | set(planted["b_response"])
    response = json.loads((tmp_path / "stats" / "statistics.json").read_text())["endpoints"]["response"]
    assert response["members"] == ["pharma-a", "pharma-b"]
    top = [row["feature"] for row in response["markers"][:5] + response["markers_down"][:5]]
    assert sum(feature in planted for feature in top) >= 8, top
    assert all(row["t"] > 0 for row in response["markers"]) and all(row["t"] < 0 for row in response["markers_down"])

    # the run registered the shared model that the member then scored its new samples with
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["tracking"]["registered_model"] == "models:/my-consortium/1"
    scores = pd.read_csv(tmp_path / "scores.csv", dtype={"response_set": str})
    assert len(scores) == 200
    assert scores["response"].between(0, 1).all()
    assert set(scores["response_set"]) <= {"0", "1", "0,1"}
    flagged = scores["alert response>0.5"]  # the README's --alert: flags exactly the samples beyond it
    assert flagged.any() and (flagged == (scores["response"] > 0.5)).all()

    # the release verified the job, reported it and wrote a signed audit log
    released = json.loads((tmp_path / "released" / "report.json").read_text())
    assert released["job_id"] == JOB
    assert verify_log(tmp_path / "released" / "audit.jsonl").ok
