"""The site loop's wait for the next round (no FLARE processes): short polls, and an end it notices."""

from __future__ import annotations

import time

from nvflare.app_common.abstract.fl_model import FLModel

from jobs.site import next_round


class PollingFlare:
    """Like the in-process Client API: ``receive(timeout)`` sleeps out its timeout while no model is
    there, and returns ``None`` at once after FLARE stopped the script."""

    def __init__(self, *, model_after: int | None, stop_after: int | None = None) -> None:
        self.model_after, self.stop_after = model_after, stop_after
        self.timeouts: list[float | None] = []
        self.running_checks = 0

    def _stopped(self) -> bool:
        return self.stop_after is not None and len(self.timeouts) > self.stop_after

    def is_running(self) -> bool:
        self.running_checks += 1
        return not self._stopped()

    def receive(self, timeout: float | None = None) -> FLModel | None:
        self.timeouts.append(timeout)
        if self._stopped():
            return None
        if self.model_after is not None and len(self.timeouts) > self.model_after:
            return FLModel(params={}, current_round=3)
        time.sleep(timeout or 0.0)
        return None

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        raise AssertionError("not called here")


def test_the_next_round_is_asked_for_with_short_timeouts():
    api = PollingFlare(model_after=3)
    received = next_round(api, poll=0.01)
    assert received is not None and received.current_round == 3
    assert api.timeouts == [0.01, 0.01, 0.01, 0.01]
    assert api.running_checks == 0  # is_running() waits like receive() does: never asked while polling


def test_a_stopped_job_ends_the_loop():
    api = PollingFlare(model_after=None, stop_after=2)
    assert next_round(api, poll=0.01) is None
    assert api.timeouts == [0.01, 0.01, 0.01]
    assert api.running_checks == 1
