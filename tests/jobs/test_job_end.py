"""The server's job-end mark: written at ABOUT_TO_END_RUN (results complete), then at END_RUN."""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from jobs.job_end import MarkJobEnded
from schema.names import JOB_ENDED_FILE


class _Engine:
    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def get_workspace(self) -> Workspace:
        return self.workspace


def _server(tmp_path: Path) -> tuple[FLContext, Path]:
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    workspace = Workspace(root_dir=str(tmp_path))
    run_dir = Path(workspace.get_run_dir("job-1"))
    run_dir.mkdir()
    fl_ctx = FLContext()
    fl_ctx.put(ReservedKey.ENGINE, _Engine(workspace), private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.CURRENT_JOB_ID, "job-1", private=True, sticky=False)
    return fl_ctx, run_dir / JOB_ENDED_FILE


def test_the_mark_says_results_complete_then_ended(tmp_path):
    fl_ctx, path = _server(tmp_path)
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


def test_a_fatal_error_is_in_the_mark(tmp_path):
    fl_ctx, path = _server(tmp_path)
    fl_ctx.set_prop(FLContextKey.FATAL_SYSTEM_ERROR, True, private=True, sticky=False)
    MarkJobEnded().handle_event(EventType.ABOUT_TO_END_RUN, fl_ctx)
    assert json.loads(path.read_text())["fatal"] is True
