"""What a run folder keeps of its jobs so that ``--resume`` continues them (no FLARE processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium.results import JobResults, read_job
from consortium.run_state import FINISHED, INTERRUPTED, ResumeError, RunState, job_key, keep_part, kept_folder
from jobs.store import read_aggregate
from schema.names import GLOBAL_MODEL_FILE
from tests.helpers import server_folder

ARGS = {"config": "/c/consortium.yaml", "env": "poc", "rounds": 4, "he": True, "folds": None, "seeds": 1}


def test_an_interrupted_job_keeps_the_rounds_its_stored_aggregate_closes(tmp_path):
    state = RunState(arguments=ARGS)
    source = server_folder(tmp_path / "server", rounds_recorded={"a": 3, "b": 2}, stored_round=1)
    part = keep_part(state, tmp_path, "seed0", source=source, job_id="job-x", first_round=0, finished=False)
    assert (part.status, part.first_round, part.rounds_done) == (INTERRUPTED, 0, 2)
    kept = read_job(kept_folder(tmp_path, "seed0"), config=_config())
    assert {s: [r["round"] for r in rs] for s, rs in kept.records.items()} == {
        "a": [0, 1],
        "b": [0, 1],
    }  # a's 2 dropped
    assert read_aggregate(kept.global_model).round == 1
    again = RunState.load(tmp_path)
    assert again.next_round("seed0") == 2 and not again.finished("seed0")
    assert again.last_aggregate(tmp_path, "seed0") == tmp_path / "jobs" / "seed0" / "part00" / GLOBAL_MODEL_FILE
    assert [k for k, _ in again.interrupted()] == ["seed0"]


def test_the_continuing_part_completes_the_job_read_as_one(tmp_path):
    state = RunState(arguments=ARGS)
    first = server_folder(tmp_path / "s1", rounds_recorded={"a": 3, "b": 1}, stored_round=1)
    keep_part(state, tmp_path, "seed0", source=first, job_id="job-1", first_round=0, finished=False)
    later = server_folder(tmp_path / "s2", rounds_recorded={"a": 4, "b": 4}, stored_round=3, first=2)
    part = keep_part(state, tmp_path, "seed0", source=later, job_id="job-2", first_round=2, finished=True)
    assert (part.status, part.rounds_done, part.folder) == (FINISHED, 4, "jobs/seed0/part01")
    results = read_job(kept_folder(tmp_path, "seed0"), config=_config())
    assert results.global_model.parent.name == "part01"  # the last part's aggregate is the job's
    assert [r["round"] for r in results.records["a"]] == [0, 1, 2, 3]
    # b missed round 1 before the interruption and answered again in the continuing job
    assert results.dropped(["a", "b"], 4) == {"b": 1}
    assert results.rejoined(["a", "b"], 4) == {"b": 2}
    assert results.finished(["a", "b"], 4) == ["a", "b"]


def test_a_job_that_stored_nothing_starts_over(tmp_path):
    state = RunState(arguments=ARGS)
    source = server_folder(tmp_path / "server", rounds_recorded={"a": 1}, stored_round=None)
    assert keep_part(state, tmp_path, "seed0", source=source, job_id="job-x", first_round=0, finished=False) is None
    assert state.next_round("seed0") == 0 and state.last_aggregate(tmp_path, "seed0") is None


def test_resume_refuses_other_arguments_naming_them(tmp_path):
    RunState(arguments=ARGS).save(tmp_path)
    state = RunState.load(tmp_path)
    state.check_arguments(dict(ARGS), out=tmp_path)
    with pytest.raises(ResumeError, match=r"he=True \(now False\), rounds=4 \(now 6\).*same arguments"):
        state.check_arguments({**ARGS, "rounds": 6, "he": False}, out=tmp_path)


def test_an_unreadable_state_says_to_start_again(tmp_path):
    (tmp_path / "run_state.json").write_text("{not json")
    with pytest.raises(ResumeError, match="run_state.json: unreadable run state.*without --resume"):
        RunState.load(tmp_path)
    assert RunState.load(tmp_path / "empty") is None


def test_job_keys_name_the_seed_and_fold():
    assert [job_key(0, None), job_key(1, 3)] == ["seed0", "seed1-fold3"]


def test_dropped_counts_from_the_first_round_recorded():
    results = JobResults(
        folder=Path("."), records={"a": [{"round": 2}, {"round": 3}], "b": [{"round": 2}]}, global_model=None
    )
    assert results.dropped(["a", "b"], 4) == {"b": 3}  # a continuing job's folder alone starts at round 2
    assert results.rejoined(["a", "b"], 4) == {}


def _config():
    class Member:
        def __init__(self, name: str) -> None:
            self.name = name

    class Config:
        name = "test"
        members = [Member("a"), Member("b")]

    return Config()
