"""The server's job-end mark: written at ABOUT_TO_END_RUN (results complete), then at END_RUN."""

from __future__ import annotations

import json

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey

from jobs.job_end import MarkJobEnded
from schema.names import JOB_ENDED_FILE


def test_the_mark_says_results_complete_then_ended(server_run):
    fl_ctx, run_dir = server_run
    path = run_dir / JOB_ENDED_FILE
    mark = MarkJobEnded()
    for event in (EventType.START_RUN, EventType.END_WORKFLOW):
        mark.handle_event(event, fl_ctx)
    assert not path.exists()
    mark.handle_event(EventType.ABOUT_TO_END_RUN, fl_ctx)
    first = json.loads(path.read_text())
    assert first["job_id"] == "job-1" and first["fatal"] is False and "ended_at" not in first
    mark.handle_event(EventType.END_RUN, fl_ctx)
    second = json.loads(path.read_text())
    assert second["results_at"] == first["results_at"] <= second["ended_at"]
    assert [p.name for p in path.parent.iterdir()] == [JOB_ENDED_FILE]  # no partial file left


def test_a_fatal_error_is_in_the_mark(server_run):
    fl_ctx, run_dir = server_run
    path = run_dir / JOB_ENDED_FILE
    fl_ctx.set_prop(FLContextKey.FATAL_SYSTEM_ERROR, True, private=True, sticky=False)
    MarkJobEnded().handle_event(EventType.ABOUT_TO_END_RUN, fl_ctx)
    assert json.loads(path.read_text())["fatal"] is True
