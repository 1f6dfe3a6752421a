"""The progress of a job: its last report says every round once the job ended without an error."""

from __future__ import annotations

import json

import pytest

from consortium.run_job import watch_rounds
from schema.names import PUBLISHED_FILE


def _records(folder, rounds: int) -> None:
    path = folder / "server" / "app_server" / PUBLISHED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"site": site, "round": r, "train_loss": 0.5} for r in range(rounds) for site in ("a", "b")]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_job_that_ended_shows_every_round_even_when_its_folder_was_archived(tmp_path):
    seen = []
    with watch_rounds(tmp_path / "flare", 5, lambda done, total, info: seen.append((done, total))):
        pass  # the job ended before the watch looked once, and its server moved its folder away (POC)
    assert seen[-1] == (5, 5)


def test_a_failed_job_shows_only_the_rounds_its_server_recorded(tmp_path):
    seen = []
    with (
        pytest.raises(RuntimeError),
        watch_rounds(tmp_path / "flare", 5, lambda done, total, info: seen.append((done, total))),
    ):
        _records(tmp_path / "flare", 2)
        raise RuntimeError("the job failed")
    assert all(done <= 2 and total == 5 for done, total in seen)  # never "5/5" for a job that failed
