"""NVFlare settings that have no working public knob in the pinned version, set where they apply.

Each is set only for the version it was read from (``setup.cfg`` pins ``nvflare==2.9.0``); with any
other version the default stays and a warning says so. ``tests/test_architecture.py`` allows these
private names here only.

**The executor's result polling.** The in-process Client API executor waits for the client script's
result by sleeping 0.5 s between looks (``_RESULT_POLL_INTERVAL`` in
``nvflare/app_common/executors/client_api/in_process_backend.py``, NVFlare 2.9.0): on average a
quarter of a second added to every round, up to half a second, for each member. There is no public
setting for it, so it is set here, in the member's own process.

**The server's task checks.** A workflow's public ``task_check_period`` (``ScatterAndGather``'s, for
one) is meant to pace how often the server looks at its tasks, but NVFlare 2.9's
``Controller.set_communicator`` hands it to the communicator as ``task_check_period`` while
``WFCommServer`` reads ``_task_check_period`` (its own default, 0.2 s). Both of the server's waits at
the end of a round use the communicator's value: its task monitor notices that the last result came
in, then the workflow's ``broadcast_and_wait`` notices that the task ended. With 0.2 s each, 0.2-0.4 s
pass between the last member's result and the aggregation, every round. :func:`pace_task_checks`
gives the communicator the workflow's period.

**The simulator's task retries.** In FLARE's simulator, a member that asks for its next task before
the server has one sleeps 0.5 s before it asks again, up to ``FETCH_TASK_RUN_RETRY`` (3) times: a
literal ``time.sleep(0.5)`` in ``nvflare/private/fed/app/simulator/simulator_worker.py``, the module
each simulated member runs as ``__main__``. Members that finish a round before the slowest one are in
that loop when the next round starts, so they pick it up 0-0.5 s late. With one try, the worker goes
back to its own loop, which asks again after the server's ``task_request_interval``
(:data:`jobs.recipe.TASK_REQUEST_INTERVAL`), as a POC or production client does.
:class:`SimulatorTaskPacing`, a client component the recipe adds in the simulator only, sets it as
FLARE builds the member's app: the worker module is ``__main__`` then (the client script, later, runs
under ``runpy`` with a ``__main__`` of its own).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import nvflare
from nvflare.apis.fl_component import FLComponent

log = logging.getLogger(__name__)

PINNED_NVFLARE = "2.9.0"
RESULT_POLL_SECONDS = 0.02
SIMULATOR_WORKER = "nvflare.private.fed.app.simulator.simulator_worker"
SIMULATOR_TASK_TRIES = 1


def shorten_result_polling(*, seconds: float = RESULT_POLL_SECONDS) -> bool:
    """Make this process's in-process executor look for the script's result every ``seconds``.

    The executor reads the module constant at each look, so setting it from the client script (which
    runs in the executor's process) takes effect from the first round. Returns whether it was set."""
    from nvflare.app_common.executors.client_api import in_process_backend

    if not _pinned(in_process_backend, "_RESULT_POLL_INTERVAL", what="the executor's result polling"):
        return False
    in_process_backend._RESULT_POLL_INTERVAL = float(seconds)
    return True


def pace_task_checks(communicator: Any, *, workflow: Any) -> bool:
    """Make the server's workflow communicator (``WFCommServer``) check its tasks as often as the
    workflow's own ``task_check_period`` says (both keep it as ``_task_check_period``). Called from the
    workflow's ``set_communicator``, before the job starts; returns whether it was set."""
    if not _pinned(communicator, "_task_check_period", what="the server's task checks"):
        return False
    communicator._task_check_period = float(workflow._task_check_period)
    return True


def shorten_simulator_task_retries(*, tries: int = SIMULATOR_TASK_TRIES) -> bool:
    """In a simulated member's process, ask for the next task at the server's interval instead of
    sleeping 0.5 s between tries; returns whether it was set (never outside FLARE's simulator)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or spec.name != SIMULATOR_WORKER:
        return False  # POC and provisioned kits: the client's own loop asks at the server's interval
    if not _pinned(main, "FETCH_TASK_RUN_RETRY", what="the simulator's task retries"):
        return False
    main.FETCH_TASK_RUN_RETRY = int(tries)
    return True


class SimulatorTaskPacing(FLComponent):
    """Member-side component for FLARE's simulator: :func:`shorten_simulator_task_retries` when FLARE
    builds it, in the member's worker process, before the member's first task."""

    def __init__(self, tries: int = SIMULATOR_TASK_TRIES) -> None:
        super().__init__()
        self.tries = int(tries)
        if shorten_simulator_task_retries(tries=self.tries):
            log.info("simulator: this member asks for its next task at the server's interval, no 0.5 s retries")


def _pinned(owner: Any, name: str, *, what: str) -> bool:
    """True when this is the NVFlare version the setting was read from and ``owner`` still has it."""
    if nvflare.__version__ != PINNED_NVFLARE:
        log.warning(
            "NVFlare %s is not the %s this tuning was read from: %s stay at the default",
            nvflare.__version__,
            PINNED_NVFLARE,
            what,
        )
        return False
    if not hasattr(owner, name):
        log.warning(
            "%s has no %s in NVFlare %s: %s stay at the default", type(owner).__name__, name, PINNED_NVFLARE, what
        )
        return False
    return True
