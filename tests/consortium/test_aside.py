"""A call handed to a second process: its answer, its exception, its death, its end."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from consortium.aside import Aside, AsideError


def _square(values: np.ndarray, *, offset: float) -> tuple[np.ndarray, int]:
    import torch

    return values**2 + offset, torch.get_num_threads()


def _refuse(name: str) -> None:
    raise ValueError(f"no such member: {name}")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel does to a process that takes too much memory


def _sleep() -> None:
    time.sleep(60)


def test_the_answer_comes_back_with_the_threads_asked():
    values, threads = Aside(_square, np.arange(4.0), offset=1.0, threads=1).result()
    np.testing.assert_array_equal(values, [1.0, 2.0, 5.0, 10.0])
    assert threads == 1


def test_an_exception_in_the_process_is_raised_here():
    with pytest.raises(ValueError, match="no such member: pharma-z"):
        Aside(_refuse, "pharma-z").result()


def test_a_process_that_dies_is_an_error_not_a_wait():
    with pytest.raises(AsideError, match=r"baselines ended \(exit code -9\) before it answered"):
        Aside(_die, what="baselines").result()


def test_stop_ends_a_running_process():
    work = Aside(_sleep)
    started = time.monotonic()
    work.stop()
    assert not work.running and time.monotonic() - started < 10
