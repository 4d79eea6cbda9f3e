"""The C library's memory policy (glibc only): training keeps freed memory for reuse, the service
bounds what it keeps."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
#: The service's policy: two malloc arenas, and every block of 1 MiB or more mapped on its own.
SERVING_ARENAS = 2
SERVING_MMAP_THRESHOLD = 1024 * 1024
#: Seconds between two hand-backs of the free pages inside the service's heaps (:class:`PeriodicTrim`).
SERVING_TRIM_INTERVAL_S = 10.0


def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """While open, glibc's malloc keeps freed memory for reuse instead of handing it back.

    By default a large tensor is mmap-ed and unmapped when freed, so every forward and backward
    pass page-faults its activations in again: on this 2-core machine that kernel time made a Lite2
    forward pass 3.8× slower (README, "Training"). On exit the defaults come back and the kept
    memory is returned, so what runs next (export, evaluation) does not add its peak to training's.
    Yields False, changing nothing, where the C library is not glibc.
    """
    libc = _glibc()
    largest = ctypes.c_int(2**31 - 1)
    kept = libc is not None and all(libc.mallopt(p, largest) for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        if libc is not None:
            for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
                libc.mallopt(parameter, ctypes.c_int(_GLIBC_DEFAULT_THRESHOLD))
            libc.malloc_trim(0)


def bound_freed_memory(
    *, arenas: int = SERVING_ARENAS, mmap_threshold: int = SERVING_MMAP_THRESHOLD
) -> dict[str, int]:
    """Keep a long-running server's resident memory flat: call before its threads start.

    glibc gives each thread an arena of its own (up to 8 per core) and keeps what is freed in it; it
    also raises its mmap threshold to the largest block freed so far, so after one 3 MB phone upload
    every later one is carved from an arena and stays there. Two arenas and a fixed 1 MiB threshold
    (uploads and decoded phone photos are mapped and handed back when freed; a dataset photo's
    buffers stay below it) took the service from 344 to 304 MB after 10,000 requests at the same CPU
    per request; :class:`PeriodicTrim` returns the holes left between live blocks
    (docs/experiments.md). ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` set in the environment
    win. Returns what was applied ({} on other C libraries).
    """
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for env, parameter, value in (
        ("MALLOC_ARENA_MAX", _M_ARENA_MAX, arenas),
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold),
    ):
        if env not in os.environ and libc.mallopt(parameter, ctypes.c_int(value)):
            applied[env] = value
    logger.debug("malloc policy: %s", applied)
    return applied


class PeriodicTrim:
    """Every ``interval_s``, hand the free pages inside the heaps back to the system (``malloc_trim``).

    Small blocks freed between live ones (an upload's 64 KB chunks, a request's objects) leave holes
    no threshold returns; after a burst of phone photos they held ~50 MB. One trim walks the heaps in
    a few milliseconds; every 10 s it cost no measurable CPU per request at concurrency 16.
    """

    def __init__(self, interval_s: float = SERVING_TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start trimming; False (and nothing started) where the C library is not glibc."""
        libc = _glibc()
        if libc is None:
            return False
        self._thread = threading.Thread(
            target=self._run, args=(libc,), name="catsdogs-malloc-trim", daemon=True
        )
        self._thread.start()
        return True

    def _run(self, libc: Any) -> None:
        while not self._stop.wait(self.interval_s):
            libc.malloc_trim(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
