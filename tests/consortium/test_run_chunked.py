"""A real 2-round simulator run with every member read from its file in chunks (``members[].read: chunks``)
completes and releases the statistics the same run gives with the members read into memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from consortium.cli import main
from consortium.commands.synth import synthesize


def _run(config: Path, out: Path) -> dict:
    args = ["run", "--config", str(config), "--env", "sim", "--out", str(out), "--rounds", "2", "--no-he"]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_run_reading_its_members_in_chunks_releases_the_in_memory_statistics(tmp_path):
    config = synthesize(tmp_path / "data", sizes=[120, 150], n_features=120, seed=5, rounds=2, shared=("response",))
    raw = yaml.safe_load(config.read_text())
    raw["privacy"] = {"he": {"enabled": False}}
    reports = {}
    for read in ("memory", "chunks"):
        for member in raw["members"]:
            member["read"] = read
        path = config.with_name(f"consortium-{read}.yaml")
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        reports[read] = _run(path, tmp_path / f"run-{read}")
    memory, chunks = (reports[r]["biomarkers"]["statistics"] for r in ("memory", "chunks"))
    assert sorted(chunks) == sorted(memory) and memory
    for endpoint, rows in memory.items():
        got = {row["feature"]: row for row in chunks[endpoint]}
        assert sorted(got) == sorted(row["feature"] for row in rows), endpoint
        for row in rows:
            for column, value in row.items():
                if isinstance(value, float):
                    np.testing.assert_allclose(got[row["feature"]][column], value, rtol=1e-9, atol=1e-12)
    assert reports["chunks"]["biomarkers"]["model"]  # the network trained on rows read from the files
