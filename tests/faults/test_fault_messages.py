"""The checks behind the fault messages, without a FLARE system: is the server there, who did not come up."""

from __future__ import annotations

import socket
import threading

import pytest

from consortium.backends import poc
from consortium.backends.poc_system import server_down, server_stopped_message, sites_not_up
from schema.config import config_from_dict

pytestmark = pytest.mark.fault


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def config(small_config_dict, tmp_path):
    fl_port, admin_port = _free_ports(2)
    small_config_dict["operator"].update(fl_port=fl_port, admin_port=admin_port)
    return config_from_dict(small_config_dict, source=tmp_path / "consortium.yaml")


def test_a_server_with_nothing_listening_is_down_naming_its_ports(config):
    reason = server_down(config)
    assert reason == (
        f"nothing listens on operator.fl_port = {config.operator.fl_port} or "
        f"operator.admin_port = {config.operator.admin_port} any more"
    )


def test_a_listening_server_is_up(config):
    with socket.create_server(("127.0.0.1", config.operator.admin_port)):
        assert server_down(config) is None  # one port answering is a server still there


def test_the_stopped_server_message_names_the_cause_the_log_and_the_way_on(config, tmp_path):
    message = server_stopped_message(config, tmp_path / "prod", "job-1")
    assert message.startswith("the FLARE server 'localhost' stopped while job job-1 was running (nothing listens")
    assert f"The server's log: {tmp_path / 'prod' / 'localhost' / 'log.txt'}" in message
    assert message.endswith("Every FLARE process this run started has been stopped")


def test_a_start_names_the_site_that_did_not_come_up_and_its_log(config, tmp_path):
    prod = tmp_path / "prod"
    (prod / "m1").mkdir(parents=True)
    (prod / "localhost").mkdir()
    (prod / "localhost" / "log.txt").write_text("server started\n")
    lines = sites_not_up(config, prod).splitlines()
    assert lines == [
        f"server 'localhost' is not up ({server_down(config)}); its log: {prod / 'localhost' / 'log.txt'}",
        f"member 'm1' did not register with the server; its log: {prod / 'm1' / 'poc_console.log'}",
    ]
    (prod / "m1" / "log.txt").write_text("... Successfully registered client:m1 for project tiny.\n")
    with socket.create_server(("127.0.0.1", config.operator.fl_port)):
        assert sites_not_up(config, prod) == f"every process came up late; the logs are under {prod}"


class _HangingRun:
    """A job handle whose status call hangs, as FLARE's does on a dead server (its login timeout is 30 s)."""

    def __init__(self, *, error: Exception | None = None) -> None:
        self.error, self.released = error, threading.Event()

    def get_status(self) -> str:
        if self.error is not None:
            raise self.error
        self.released.wait(10)
        return "FINISHED:COMPLETED"


def test_a_status_call_hanging_on_a_dead_server_is_abandoned():
    looks = iter([None, "nothing listens"])
    run = _HangingRun()
    try:
        status = poc.wait_until_finished(run, timeout=60, stopped=lambda: next(looks, "nothing listens"))
    finally:
        run.released.set()
    assert status == "SERVER_STOPPED"


def test_a_failing_status_call_still_raises_in_the_caller():
    with pytest.raises(RuntimeError, match="session refused"):
        poc.wait_until_finished(_HangingRun(error=RuntimeError("session refused")), timeout=60, stopped=lambda: None)
