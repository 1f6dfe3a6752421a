"""One function call in a second process, started now and collected later: work that needs nothing
from the federated jobs (the baseline arms) runs while they do, instead of after them.

The process is spawned (not forked: the command holds threads of FLARE's admin client and MLflow),
torch in it gets ``threads`` threads, and it is killed on :meth:`Aside.stop` (or with the command).
A process that dies without answering (killed for memory, say) is an error naming its exit code,
never a wait for ever.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class AsideError(RuntimeError):
    """The second process failed or ended without an answer."""


def _call(send, threads: int, function: Callable, args: tuple, kwargs: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        answer: tuple[str, Any] = ("ok", function(*args, **kwargs))
    except BaseException as exc:  # handed to the caller, which raises it
        answer = ("error", exc)
    try:
        send.send(answer)
    except (pickle.PicklingError, TypeError, AttributeError):
        send.send(("error", AsideError(f"{type(answer[1]).__name__}: {answer[1]}")))
    finally:
        send.close()


class Aside:
    """``function(*args, **kwargs)`` running in a spawned process; :meth:`result` waits for it."""

    def __init__(self, function: Callable, *args: Any, threads: int = 1, what: str = "work", **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.what = what
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_call, args=(send, threads, function, args, kwargs), name=f"aside: {what}", daemon=True
        )
        self._process.start()
        send.close()  # only the child holds the sending end: its death reads as the end of the pipe
        log.info("%s: started in process %d", what, self._process.pid)

    def result(self) -> Any:
        """The call's return value, or its exception raised here."""
        try:
            status, value = self._receive.recv()
        except EOFError:
            self._process.join(10)
            raise AsideError(
                f"the process computing the {self.what} ended (exit code {self._process.exitcode}) before it "
                "answered; if the machine ran out of memory, run without --baselines or on fewer features"
            ) from None
        finally:
            self._receive.close()
        self._process.join(10)
        if status == "error":
            raise value
        return value

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        """Kill the process if it still runs (the command is leaving)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join(10)
