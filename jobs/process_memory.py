"""A member process's heap: freed arrays go back to the system, except while the member trains.

glibc's ``malloc`` serves a request of 128 KiB or more with a mapping of its own, but after each such
block is freed it raises that threshold to the block's size (up to 32 MiB on 64-bit Linux), so after the
first rounds a member's arrays of a few to a few tens of MiB (blocks of the statistics, predictions,
messages FLARE serializes) come from the heap, whose freed pages stay resident.
:func:`return_freed_arrays` fixes the threshold at 128 KiB for the process: each such array is unmapped
when freed. Training is the exception: a 20,000-feature member's gradients and optimizer temporaries (20
MB each) mapped and faulted in anew every step doubled its epochs' time, so :func:`training_heap` serves
them from the heap (threshold 32 MiB, glibc's own ceiling) and returns the heap's free pages afterwards.
``benchmarks/member_memory.py``; figures in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
FREED_ARRAYS_THRESHOLD = 128 * 1024  # glibc's default, kept fixed
TRAINING_THRESHOLD = 32 * 1024 * 1024  # the ceiling glibc's own adjustment reaches on 64-bit Linux


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        log.debug("not glibc (%s): the heap keeps its default thresholds", name)
        return None
    return libc


def _threshold(size: int) -> bool:
    """mmap threshold ``size``, trim threshold twice it (glibc's own rule when it adjusts them): a heap that
    serves arrays keeps its top free pages for the next ones instead of returning and faulting them in."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(2 * size))
    return bool(trim and libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(size)))


def return_freed_arrays() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; ``False`` (nothing changed) without glibc."""
    return _threshold(FREED_ARRAYS_THRESHOLD)


@contextmanager
def training_heap() -> Iterator[None]:
    """Inside: arrays under 32 MiB come from the heap (fast to reuse step after step); after: the heap's
    free pages go back to the system and the 128 KiB threshold holds again."""
    _threshold(TRAINING_THRESHOLD)
    try:
        yield
    finally:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(ctypes.c_size_t(0))
        _threshold(FREED_ARRAYS_THRESHOLD)
