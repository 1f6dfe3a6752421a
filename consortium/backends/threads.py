"""Thread sizing for FLARE processes that share this machine's cores."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Read by torch, OpenBLAS and MKL when a process loads them: how many threads their kernels use."""


def threads_each(processes: int) -> int:
    """Threads for each of ``processes`` busy processes on this machine: the user's ``OMP_NUM_THREADS``,
    else an equal share of the cores this process may use (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def shared_threads(members: int) -> dict[str, str]:
    """The thread variables for FLARE processes that all run on this machine: each member gets its share
    of the cores (:func:`threads_each`; torch and BLAS otherwise start a thread per core in every member,
    and members training at once on fewer cores wait on each other's threads). A variable already set
    in the environment is left as it is; provisioned kits, one machine per member, get none of this."""
    threads = str(threads_each(members))
    return {name: threads for name in THREAD_VARIABLES if not os.environ.get(name)}


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment (inherited by the processes it starts), then removed."""
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in variables:
            os.environ.pop(name, None)
