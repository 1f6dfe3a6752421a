"""The private NVFlare settings of jobs.flare_tuning: set for the pinned version, left alone otherwise."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types
from importlib.machinery import ModuleSpec

import nvflare
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.app_common.executors.client_api import in_process_backend
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from jobs import flare_tuning
from jobs.recipe import TASK_CHECK_PERIOD
from jobs.workflow import SumScatterAndGather


def _workflow(cls: type[ScatterAndGather]) -> ScatterAndGather:
    return cls(min_clients=2, num_rounds=3, task_check_period=TASK_CHECK_PERIOD, train_task_name="train")


def test_flare_drops_the_workflows_check_period_on_the_way_to_its_communicator():
    """Why the tuning exists: stock NVFlare 2.9 leaves the server's task checks at 0.2 s. Should a
    release fix this, this test fails and the tuning can go."""
    communicator = WFCommServer()
    _workflow(ScatterAndGather).set_communicator(communicator)
    assert communicator._task_check_period == 0.2


def test_our_workflow_hands_its_check_period_to_the_communicator():
    communicator = WFCommServer()
    _workflow(SumScatterAndGather).set_communicator(communicator)
    assert communicator._task_check_period == TASK_CHECK_PERIOD
    assert communicator.controller is not None  # FLARE's own wiring still done


def test_other_nvflare_versions_keep_the_defaults_and_say_so(monkeypatch, caplog):
    monkeypatch.setattr(nvflare, "__version__", "2.10.0")
    monkeypatch.setattr(in_process_backend, "_RESULT_POLL_INTERVAL", 0.5)
    communicator = WFCommServer()
    with caplog.at_level(logging.WARNING, logger=flare_tuning.__name__):
        _workflow(SumScatterAndGather).set_communicator(communicator)
        assert flare_tuning.shorten_result_polling() is False
    assert communicator._task_check_period == 0.2
    assert in_process_backend._RESULT_POLL_INTERVAL == 0.5
    messages = [r.getMessage() for r in caplog.records]
    assert any("the server's task checks stay at the default" in m and "2.10.0" in m for m in messages)
    assert any("the executor's result polling stay" in m for m in messages)


def test_the_pinned_version_shortens_the_executors_result_polling(monkeypatch):
    monkeypatch.setattr(in_process_backend, "_RESULT_POLL_INTERVAL", 0.5)
    assert flare_tuning.shorten_result_polling(seconds=0.03) is True
    assert in_process_backend._RESULT_POLL_INTERVAL == 0.03


def test_a_communicator_without_the_setting_is_left_alone(caplog):
    owner = object()
    with caplog.at_level(logging.WARNING, logger=flare_tuning.__name__):
        assert flare_tuning.pace_task_checks(owner, workflow=_workflow(ScatterAndGather)) is False
    assert not hasattr(owner, "_task_check_period")
    assert "the server's task checks stay at the default" in caplog.text


def _as_main(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType("__main__")
    module.__spec__ = ModuleSpec(name, None)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, "__main__", module)
    return module


def test_the_simulators_worker_retries_a_task_fetch_after_half_second_sleeps():
    """What the tuning changes, read from the pinned NVFlare: FETCH_TASK_RUN_RETRY tries, 0.5 s apart."""
    worker = importlib.import_module(flare_tuning.SIMULATOR_WORKER)
    assert worker.FETCH_TASK_RUN_RETRY == 3
    source = inspect.getsource(worker.ClientTaskWorker.do_one_task)
    assert "run_task_tries >= FETCH_TASK_RUN_RETRY" in source and "time.sleep(0.5)" in source


def test_a_simulated_members_worker_asks_once_per_loop(monkeypatch, caplog):
    worker = _as_main(monkeypatch, flare_tuning.SIMULATOR_WORKER, FETCH_TASK_RUN_RETRY=3)
    with caplog.at_level(logging.INFO, logger=flare_tuning.__name__):
        component = flare_tuning.SimulatorTaskPacing()
    assert worker.FETCH_TASK_RUN_RETRY == 1
    assert component.tries == 1
    assert "no 0.5 s retries" in caplog.text


def test_outside_the_simulator_nothing_changes(monkeypatch):
    other = _as_main(monkeypatch, "consortium.cli", FETCH_TASK_RUN_RETRY=3)
    assert flare_tuning.shorten_simulator_task_retries() is False
    assert other.FETCH_TASK_RUN_RETRY == 3
    script = types.ModuleType("__main__")  # the client script under runpy: a __main__ without a spec
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert flare_tuning.shorten_simulator_task_retries() is False


def test_another_version_of_the_simulator_keeps_its_retries(monkeypatch):
    worker = _as_main(monkeypatch, flare_tuning.SIMULATOR_WORKER, FETCH_TASK_RUN_RETRY=3)
    monkeypatch.setattr(nvflare, "__version__", "2.10.0")
    assert flare_tuning.shorten_simulator_task_retries() is False
    assert worker.FETCH_TASK_RUN_RETRY == 3
